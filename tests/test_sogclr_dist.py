"""SogCLR in 1 process vs 2 gloo processes with the same global batch (sogclr_caco.md A1, A5).

Each rank takes its half of every global batch; parameter gradients are averaged over ranks
(what DDP does). BN is in eval mode so that samples do not interact (no SyncBN on CPU).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from src.methods.sogclr import dcl_loss
from tests.dist_utils import run_distributed
from tests.test_sogclr import make_steps, ref_dcl_step, tiny_method

CONFIGS = [("dcl", False), ("dcl", True), ("cl", True)]


def _run(rank: int, world_size: int, steps, first_visit_steps) -> dict:
    """Per config: per-step loss (mean over ranks), u after the step, averaged parameter grads;
    and u after ``first_visit_steps`` (the per-rank first-visit rule)."""
    out = {"first_visit": _first_visit_ranks(rank, world_size, *first_visit_steps)}
    for loss_type, full in CONFIGS:
        m = tiny_method(loss_type, full)
        rec = {"loss": [], "u": [], "grad": []}
        for x1, x2, idx in steps:
            B = x1.shape[0] // world_size
            sl = slice(rank * B, (rank + 1) * B)
            m.zero_grad()
            res = m([x1[sl], x2[sl]], idx[sl])
            res["loss"].backward()
            loss = res["loss"].detach().clone()
            grads = [p.grad.detach().clone() for p in m.parameters()]
            if world_size > 1:
                dist.all_reduce(loss)
                loss /= world_size
                for g in grads:
                    dist.all_reduce(g)
                    g /= world_size
            rec["loss"].append(loss)
            rec["u"].append(m.u.clone())
            rec["grad"].append(grads)
        out[(loss_type, full)] = rec
    return out


@pytest.fixture(scope="module")
def runs():
    steps = make_steps()
    fv = (steps[0][0], steps[0][1], [torch.arange(8), torch.tensor([4, 5, 6, 7, 8, 9, 10, 11])])
    one = _run(0, 1, steps, fv)
    two = run_distributed(_run, 2, steps, fv)
    return steps, one, two


def test_u_identical_on_every_rank_and_equal_to_one_process(runs):
    _, one, two = runs
    for cfg in CONFIGS:
        for s in range(3):
            assert torch.equal(two[0][cfg]["u"][s], two[1][cfg]["u"][s])
            torch.testing.assert_close(two[0][cfg]["u"][s], one[cfg]["u"][s], rtol=1e-6, atol=0)
            assert two[0][cfg]["loss"][s].item() == pytest.approx(one[cfg]["loss"][s].item(), rel=1e-6, abs=1e-7)
    assert (one[("dcl", False)]["u"][-1] > 0).sum().item() == 12


def test_full_grad_flag_gives_single_process_gradient(runs):
    _, one, two = runs
    for cfg in [("dcl", True), ("cl", True)]:
        for s in range(3):
            for a, b in zip(two[0][cfg]["grad"][s], one[cfg]["grad"][s]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_local_slice_gradient_is_the_documented_partial_gradient(runs):
    """Default gather: rank r's loss sees the other rank's embeddings as constants. The averaged
    gradient equals the loop reference with that detach, and differs from the full gradient."""
    steps, one, two = runs
    ref_model = tiny_method()
    u_ref: dict[int, float] = {}
    for s, (x1, x2, idx) in enumerate(steps):
        ref_model.zero_grad()
        loss = ref_dcl_step(ref_model.base_encoder(x1), ref_model.base_encoder(x2), idx.tolist(), u_ref, P=2,
                            detach_others=True)
        loss.backward()
        assert two[0][("dcl", False)]["loss"][s].item() == pytest.approx(loss.item(), rel=1e-5)
        local = two[0][("dcl", False)]["grad"][s]
        full = two[0][("dcl", True)]["grad"][s]
        for a, p in zip(local, ref_model.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)
        diff = sum((a - b).norm() ** 2 for a, b in zip(local, full)).sqrt()
        size = sum(b.norm() ** 2 for b in full).sqrt()
        assert diff > 1e-3 * size
    # the loss and u do not depend on the gather's backward
    for s in range(3):
        assert torch.equal(two[0][("dcl", False)]["u"][s], two[0][("dcl", True)]["u"][s])
        torch.testing.assert_close(two[0][("dcl", False)]["u"][s], one[("dcl", False)]["u"][s], rtol=1e-6, atol=0)


def test_index_collision_last_writer_wins_and_matches_reference(runs):
    """Step 3 has index 3 on both ranks (and 8 on both): the value written is the one of rank 1
    (last in gather order), as in the loop reference with P = 2."""
    steps, _, two = runs
    ref_model = tiny_method()
    u_ref: dict[int, float] = {}
    for x1, x2, idx in steps:
        with torch.no_grad():
            ref_dcl_step(ref_model.base_encoder(x1), ref_model.base_encoder(x2), idx.tolist(), u_ref, P=2)
    u = two[1][("dcl", False)]["u"][-1]
    for k, v in u_ref.items():
        assert u[k].item() == pytest.approx(v, rel=1e-5)
    # 3 is written by global rows 3 (rank 0) and 4 (rank 1): rank 1's value is kept
    x1, x2, idx = steps[-1]
    assert idx[3].item() == idx[4].item() == 3
    u_before = two[1][("dcl", False)]["u"][-2]
    with torch.no_grad():
        h1 = torch.nn.functional.normalize(ref_model.base_encoder(x1), dim=1)
        h2 = torch.nn.functional.normalize(ref_model.base_encoder(x2), dim=1)
        _, u1, u2 = dcl_loss(h1, h2, h1, h2, u_before[idx], 0.9, 0.1)
    rows = (u1 + u2) / 2
    assert u[3].item() == pytest.approx(rows[4].item(), rel=1e-5)
    assert u[3].item() != pytest.approx(rows[3].item(), rel=1e-3)
    assert u[8].item() == pytest.approx(rows[6].item(), rel=1e-5)


def _first_visit_ranks(rank: int, world_size: int, x1, x2, idx_steps):
    m = tiny_method()
    B = x1.shape[0] // world_size
    sl = slice(rank * B, (rank + 1) * B)
    for idx in idx_steps:
        with torch.no_grad():
            m([x1[sl], x2[sl]], idx[sl])
    return m.u.clone()


def test_first_visit_rule_is_per_rank(runs):
    """Documented difference: when one rank's indices are all unseen and the other's are not, the
    2-process run uses γ = 1 on that rank only, so u differs from the 1-process run there; both
    match the reference with their own P."""
    steps, one_run, two_run = runs
    x1, x2, _ = steps[0]
    idx_steps = [torch.arange(8), torch.tensor([4, 5, 6, 7, 8, 9, 10, 11])]
    one, two = one_run["first_visit"], [r["first_visit"] for r in two_run]
    assert torch.equal(two[0], two[1])
    ref_model = tiny_method()
    for P, got in ((1, one), (2, two[0])):
        u_ref: dict[int, float] = {}
        for idx in idx_steps:
            with torch.no_grad():
                ref_dcl_step(ref_model.base_encoder(x1), ref_model.base_encoder(x2), idx.tolist(), u_ref, P=P)
        for k, v in u_ref.items():
            assert got[k].item() == pytest.approx(v, rel=1e-5)
    torch.testing.assert_close(one[:8], two[0][:8], rtol=1e-6, atol=0)
    ratio = two[0][8:] / one[8:]  # γ = 1 vs γ = 0.9 on the new indices of rank 1
    torch.testing.assert_close(ratio, torch.full((4,), 1 / 0.9), rtol=1e-5, atol=0)
