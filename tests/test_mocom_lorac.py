"""MoCo-M / LORAC losses, nuclear norm, queue planes, LARC, schedule and multi-crop (moco_m_lorac.md §1-4).

Every reference below is a loop written from the spec's formulas, in float64 / numpy.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.methods.mocom import (MoCoM, lorac_loss, mocom_loss, nuclear_norm_per_sample, pairing_terms,
                               resolution_groups)
from tests.dist_utils import run_distributed


def unit(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def make_inputs(C=5, B=3, D=16, K=12, seed=0):
    q = unit(C, B, D, seed=seed)
    k = unit(2, B, D, seed=seed + 1)
    queue = unit(2, K, D, seed=seed + 2).transpose(1, 2).contiguous()  # (2, D, K), unit columns
    return q, k, queue


def ce0(logits: np.ndarray) -> float:
    """−log softmax(logits)[0] for one row."""
    m = logits.max()
    return float(-(logits[0] - m - math.log(np.exp(logits - m).sum())))


def ref_terms(pairing: str, C: int):
    """Written from the spec text, independently of ``pairing_terms``:
    MoCo-M (§1.3): key crop 1−j, queries all but crop 1, negatives plane 1−j.
    intended (§1.3): key crop p = 1−j, queries all but p, negatives plane p.
    LORAC (§2.1): key crop j, queries all but j, negatives plane 1−j."""
    out = []
    for j in (0, 1):
        if pairing == "hardcoded1":
            out.append((1 - j, [c for c in range(C) if c != 1], 1 - j))
        elif pairing == "key_crop":
            out.append((1 - j, [c for c in range(C) if c != 1 - j], 1 - j))
        else:
            out.append((j, [c for c in range(C) if c != j], 1 - j))
    return out


def ref_loss(q, k, queue, T, pairing, rank=None, beta=None, use_t=True):
    q, k, queue = (t.detach().double().numpy() for t in (q, k, queue))
    C, B, _ = q.shape
    total = 0.0
    for p, S, n in ref_terms(pairing, C):
        rows = []
        for c in S:
            for b in range(B):
                pos = float(q[c, b] @ k[p, b])
                neg = q[c, b] @ queue[n]
                if rank is not None:
                    pos = pos - rank[b] / beta
                logits = np.concatenate([[pos], neg])
                if use_t:
                    logits = logits / T
                rows.append(ce0(logits))
        total += np.mean(rows) / 2
    return total


def ref_nuclear(q, k, G):
    qn, kn = q.detach().double().numpy(), k.detach().double().numpy()
    return np.array([np.linalg.svd(np.concatenate([qn[:G, b], kn[:, b]], 0), compute_uv=False).sum()
                     for b in range(q.shape[1])])


# ----------------------------------------------------------------------------- pairings and losses
def test_pairing_table_matches_spec():
    for pairing in ("hardcoded1", "key_crop", "lorac"):
        assert pairing_terms(pairing, 8) == ref_terms(pairing, 8)
    # the official MoCo-M quirks: q0 scored against k0 (self-positive), q1 never used
    terms = pairing_terms("hardcoded1", 8)
    assert terms[1][0] == 0 and 0 in terms[1][1]
    assert all(1 not in S for _, S, _ in terms)


@pytest.mark.parametrize("pairing", ["hardcoded1", "key_crop", "lorac"])
def test_mocom_loss_matches_loop_reference(pairing):
    q, k, queue = make_inputs()
    loss, logits = mocom_loss(q, k, queue, 0.2, pairing)
    assert len(logits) == 2 and logits[0].shape == (4 * 3, 1 + 12)
    assert loss.item() == pytest.approx(ref_loss(q, k, queue, 0.2, pairing), rel=1e-5)
    # list-of-crops input gives the same
    loss2, _ = mocom_loss(list(q), list(k), queue, 0.2, pairing)
    assert loss2.item() == loss.item()


def test_pairings_differ():
    q, k, queue = make_inputs(seed=3)
    vals = {p: mocom_loss(q, k, queue, 0.2, p)[0].item() for p in ("hardcoded1", "key_crop", "lorac")}
    assert len({round(v, 6) for v in vals.values()}) == 3


@pytest.mark.parametrize("active,use_t", [(False, False), (True, False), (True, True)])
def test_lorac_loss_matches_loop_reference(active, use_t):
    q, k, queue = make_inputs(C=5, B=4, D=16, K=10, seed=7)
    T, beta = 0.2, 15.0
    loss, rank, logits = lorac_loss(q, k, queue, T, beta, n_global=3, use_temperature=use_t, active=active)
    if active:
        r = ref_nuclear(q, k, 3)
        want = ref_loss(q, k, queue, T, "lorac", rank=r, beta=beta, use_t=use_t)
        assert rank.item() == pytest.approx(r.mean(), rel=1e-5)
        assert math.sqrt(5) - 1e-5 <= r.min() and r.max() <= 5 + 1e-5
    else:
        want = ref_loss(q, k, queue, T, "lorac")
        assert rank.item() == 0.0
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # the logged logits are the tempered, unshifted ones of the last term (j = 1)
    p, S, n = ref_terms("lorac", 5)[1]
    assert logits[0, 0].item() == pytest.approx(float(q[S[0], 0] @ k[p, 0]) / T, rel=1e-5)


def test_lorac_default_drops_temperature():
    """After the switch the official logits are raw cosines: loss ≈ log(1+K) + r/β for near-orthogonal q, k, Q."""
    q, k, queue = make_inputs(C=5, B=4, D=64, K=512, seed=1)
    loss_off, _, _ = lorac_loss(q, k, queue, 0.2, 15.0, 3, active=False)
    loss_on, rank, _ = lorac_loss(q, k, queue, 0.2, 15.0, 3, active=True)
    assert abs(loss_on.item() - math.log(513) - rank.item() / 15.0) < 0.05
    assert abs(loss_off.item() - loss_on.item()) > 0.1


# ----------------------------------------------------------------------------- nuclear norm
def test_nuclear_norm_and_gradient_vs_numpy_svd():
    B, G, D = 6, 3, 128
    qg = unit(G, B, D, seed=11).requires_grad_(True)
    k = unit(2, B, D, seed=12).requires_grad_(True)
    r = nuclear_norm_per_sample(qg, k)
    assert r.dtype == torch.float32 and r.shape == (B,)
    np.testing.assert_allclose(r.detach().numpy(), ref_nuclear(qg.detach(), k.detach(), G), rtol=1e-5)
    r.sum().backward()
    assert k.grad is None  # keys are detached
    for b in range(B):
        M = np.concatenate([qg.detach().double().numpy()[:, b], k.detach().double().numpy()[:, b]], 0)
        U, _, Vt = np.linalg.svd(M, full_matrices=False)
        np.testing.assert_allclose(qg.grad[:, b].numpy(), (U @ Vt)[:G], atol=1e-5)


def test_nuclear_norm_range():
    same = unit(1, 2, 128, seed=0).expand(5, 2, 128)
    assert nuclear_norm_per_sample(same[:3], same[3:]).tolist() == pytest.approx([math.sqrt(5)] * 2, rel=1e-5)
    eye = torch.eye(128)[:5].unsqueeze(1)
    assert nuclear_norm_per_sample(eye[:3], eye[3:]).item() == pytest.approx(5.0, rel=1e-6)


def test_nuclear_norm_is_fp32_under_autocast():
    qg, k = unit(3, 2, 128, seed=2), unit(2, 2, 128, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = nuclear_norm_per_sample(qg.bfloat16(), k.bfloat16())
    assert r.dtype == torch.float32


# ----------------------------------------------------------------------------- the model
def crops_for(B=4, sizes=(32, 32, 32, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, s, s, generator=g) for s in sizes]


def test_resolution_groups():
    assert resolution_groups(crops_for(1)) == [(0, 3), (3, 5)]
    assert resolution_groups(crops_for(1, (32, 32))) == [(0, 2)]


def _model(lorac=False, K=16, pairing=None, **kw):
    torch.manual_seed(0)
    return MoCoM("mocom_r18", dim=32, K=K, m=0.99, T=0.2, mlp=True, nmb_crops=(3, 2),
                 pairing=pairing or ("lorac" if lorac else "hardcoded1"), lorac=lorac, **kw)


def test_model_layout_and_head():
    m = _model()
    sd = m.state_dict()
    assert sd["queue"].shape == (2, 32, 16) and sd["queue_ptr"].tolist() == [0]
    assert torch.allclose(sd["queue"].norm(dim=1), torch.ones(2, 16))
    assert isinstance(m.encoder_q.fc, torch.nn.Sequential) and [type(x).__name__ for x in m.encoder_q.fc] == \
        ["Linear", "ReLU", "Linear"] and m.encoder_q.fc[0].in_features == m.encoder_q.fc[0].out_features == 512
    assert all(not p.requires_grad for p in m.encoder_k.parameters())
    assert all(torch.equal(a, b) for a, b in zip(m.encoder_q.parameters(), m.encoder_k.parameters()))


@pytest.mark.parametrize("lorac", [False, True])
def test_forward_uses_pre_enqueue_snapshot_and_fills_planes(lorac):
    m = _model(lorac)
    m.on_epoch_start(0)
    crops = crops_for()
    twin = copy.deepcopy(m)
    q, k = twin.embed(crops)             # identical computation (1 shuffle group: no randomness)
    queue0 = m.queue.clone()
    out = m(crops, None)
    if lorac:
        want, _, _ = lorac_loss(q, k, queue0, 0.2, 15.0, 3, active=False)
    else:
        want, _ = mocom_loss(q, k, queue0, 0.2, "hardcoded1")
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.equal(m.queue[0, :, :4], k[0].T) and torch.equal(m.queue[1, :, :4], k[1].T)
    assert torch.equal(m.queue[:, :, 4:], queue0[:, :, 4:]) and m.queue_ptr.item() == 4
    # key encoder: EMA over parameters, θk ← m θk + (1−m) θq, once per step before the key forward
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(0.01)
    old_k = [p.clone() for p in m.encoder_k.parameters()]
    m(crops, None)
    for pk, ok, pq in zip(m.encoder_k.parameters(), old_k, m.encoder_q.parameters()):
        assert torch.allclose(pk, 0.99 * ok + 0.01 * pq, atol=1e-7)


def test_lorac_switch_epoch_and_temperature_flag():
    crops = crops_for(seed=5)
    for use_t in (False, True):
        m = _model(lorac=True, beta=15.0, epoch_lorac_starts=2, lorac_use_temperature=use_t)
        for epoch, active in ((0, False), (1, False), (2, True), (5, True)):
            m.on_epoch_start(epoch)
            assert m.lorac_active is active
        for epoch in (1, 2):
            m.on_epoch_start(epoch)
            twin = copy.deepcopy(m)
            q, k = twin.embed(crops)
            snap = m.queue.clone()
            out = m(crops, None)
            if epoch < 2:
                want = ref_loss(q, k, snap, 0.2, "lorac")
                assert out["rank"].item() == 0.0
            else:
                r = ref_nuclear(q, k, 3)
                want = ref_loss(q, k, snap, 0.2, "lorac", rank=r, beta=15.0, use_t=use_t)
                assert out["rank"].item() == pytest.approx(r.mean(), rel=1e-5)
            assert out["loss"].item() == pytest.approx(want, rel=1e-5)


def test_key_crops_forwarded_together_through_key_encoder():
    """BN of the key encoder sees crops 0 and 1 as one 2B batch (train mode)."""
    m = _model()
    crops = crops_for(seed=2)
    seen = []
    h = m.encoder_k.conv1.register_forward_hook(lambda mod, i, o: seen.append(i[0].shape[0]))
    seen_q = []
    h2 = m.encoder_q.conv1.register_forward_hook(lambda mod, i, o: seen_q.append(i[0].shape[0]))
    m(crops, None)
    h.remove(), h2.remove()
    assert seen == [8] and seen_q == [12, 8]   # 2B keys; queries: one call per resolution group


# ----------------------------------------------------------------------------- 1 vs 2 processes
def _enqueue_steps(rank, world_size, steps, B, dim, K):
    torch.manual_seed(0)
    m = MoCoM("mocom_r18", dim=dim, K=K, nmb_crops=(2,))
    snaps = []
    for s in range(steps):
        k_all = unit(2, B * world_size, dim, seed=100 + s)          # keys of the global batch, (crop, sample)
        mine = k_all[:, rank * B:(rank + 1) * B]
        m._dequeue_and_enqueue(mine.reshape(-1, dim))
        snaps.append((m.queue.clone(), m.queue_ptr.clone()))
    return snaps


def test_queue_planes_one_vs_two_processes_identical():
    steps, B, dim, K = 5, 3, 8, 18   # wraps around: 5 x 6 keys > 18
    one = _enqueue_steps(0, 1, steps, 2 * B, dim, K)   # one process with the whole global batch
    two = run_distributed(_enqueue_steps, 2, steps, B, dim, K)
    for s in range(steps):
        for r in range(2):
            assert torch.equal(two[r][s][0], one[s][0]) and torch.equal(two[r][s][1], one[s][1])
    # plane 0 holds crop-0 keys, plane 1 crop-1 keys, in sample order, at the shared pointer
    last = unit(2, 2 * B, dim, seed=100 + steps - 1)
    ptr = ((steps - 1) * 2 * B) % K
    assert torch.equal(one[-1][0][0][:, ptr:ptr + 2 * B], last[0].T)
    assert torch.equal(one[-1][0][1][:, ptr:ptr + 2 * B], last[1].T)
    assert one[-1][1].item() == (steps * 2 * B) % K


def _forward_eval(rank, world_size, B, steps):
    torch.manual_seed(0)
    m = _model(lorac=True, K=24, epoch_lorac_starts=0)
    m.on_epoch_start(0)
    m.eval()   # BN from running stats: embeddings independent of how the batch is split
    losses = []
    for s in range(steps):
        crops = [c[rank * B:(rank + 1) * B] for c in crops_for(B * world_size, seed=50 + s)]
        with torch.no_grad():
            losses.append(m(crops, None)["loss"])
    return m.queue.clone(), m.queue_ptr.clone(), torch.stack(losses)


def test_forward_one_vs_two_processes():
    q1, p1, l1 = _forward_eval(0, 1, 4, 3)
    res = run_distributed(_forward_eval, 2, 2, 3)
    for q2, p2, l2 in res:
        assert torch.allclose(q2, q1, atol=1e-5) and torch.equal(p2, p1)
    # each rank's loss is a mean over equally many rows: their mean is the global loss
    assert torch.allclose((res[0][2] + res[1][2]) / 2, l1, atol=1e-5)


# ----------------------------------------------------------------------------- flags and errors
def test_flag_defaults_match_spec():
    from main_lorac import get_parser as lorac_parser
    from main_moco_m import get_parser as mocom_parser
    get_parser = lambda lorac: lorac_parser() if lorac else mocom_parser()  # noqa: E731
    a = get_parser(lorac=True).parse_args([])
    want = dict(data_path="/path/to/imagenet", nmb_crops=[2], size_crops=[224], min_scale_crops=[0.14],
                max_scale_crops=[1.0], crops_for_assign=[0, 1], color_distortion_scale=1.0, moco_dim=128,
                moco_k=65536, moco_m=0.999, mlp=True, temperature=0.2, epochs=100, batch_size=64, base_lr=4.8,
                final_lr=0.0, wd=1e-6, warmup_epochs=10, start_warmup=0.0, dist_url="env://", world_size=-1,
                arch="resnet50", hidden_mlp=2048, workers=10, checkpoint_freq=10, use_fp16=True, sync_bn="pytorch",
                syncbn_process_group_size=8, dump_path=".", seed=31, resume=None, lorac_beta=15.0,
                epoch_lorac_starts=100, lorac_use_temperature=False, lorac_negatives="other_plane")
    for k, v in want.items():
        assert getattr(a, k) == v, k
    m = get_parser(lorac=False).parse_args(["--mlp", "false", "--use_fp16", "false", "--local-rank", "1",
                                            "--mocom_query_exclude", "key_crop", "--moco_k", "8"])
    assert (m.mlp, m.use_fp16, m.local_rank, m.mocom_query_exclude, m.moco_k) == (False, False, 1, "key_crop", 8)
    assert not hasattr(m, "lorac_beta")


@pytest.mark.parametrize("extra,msg", [
    (["--moco-k", "30"], "must be divisible by the global batch size 4"),
    (["--crops_for_assign", "0", "2"], "--crops_for_assign must be 0 1"),
    (["--nmb_crops", "1", "2"], "at least 2 crops"),
    (["--arch", "mocom_r34"], "unknown arch"),
])
def test_bad_input_gives_one_line(tiny_folder, tmp_path, capsys, extra, msg):
    from main_moco_m import main as main_moco_m
    argv = ["--data_path", f"{tiny_folder}/train", "--nmb_crops", "2", "1", "--size_crops", "16", "8",
            "--min_scale_crops", "0.14", "0.05", "--max_scale_crops", "1", "0.14", "--moco-k", "16",
            "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--arch", "mocom_r18",
            "--workers", "0", "--dump_path", str(tmp_path), *extra]
    with pytest.raises(SystemExit) as e:
        main_moco_m(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
