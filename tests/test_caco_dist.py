"""CaCo's memory in 1 process vs 2 gloo processes with the same global batch (sogclr_caco.md B1, B5).

The encoders run in eval mode (no sample interaction through BN), so each rank's half of a global
batch embeds exactly as in the single process; the memory step's all-reduce (mean over ranks of
per-rank batch means) must then give the single-process update, identically on every rank.
"""
from __future__ import annotations

import pytest
import torch

from src.engine.hooks import StepInfo
from tests.dist_utils import run_distributed
from tests.test_caco import crops, tiny_caco

GLOBAL_B = 8


def _run(rank: int, world_size: int) -> dict:
    return {mc: _run_one(rank, world_size, mc) for mc in (False, True)}


def _run_one(rank: int, world_size: int, multi_crop: bool) -> dict:
    m = tiny_caco(multi_crop=multi_crop).eval()
    n_crops = 4 if multi_crop else 2
    B = GLOBAL_B // world_size
    sl = slice(rank * B, (rank + 1) * B)
    out = {"W": [], "v": [], "loss": []}
    m.on_epoch_start(2)
    for step in range(3):
        c = [x[sl] for x in crops(n_crops, GLOBAL_B, seed=step)]
        res = m(c, torch.arange(GLOBAL_B)[sl])
        m.after_step(StepInfo(0, 0, 0, 0.1, applied=True))
        out["W"].append(m.W.clone())
        out["v"].append(m.v.clone())
        out["loss"].append(res["loss"].detach())
    # --ad_init's key write: the gathered keys of all ranks, in rank order
    keys = torch.randn(GLOBAL_B, m.W.shape[0], generator=torch.Generator().manual_seed(9))
    filled = m.write_keys_(keys[sl], 4)
    out["filled"], out["W_init"] = filled, m.W.clone()
    return out


@pytest.fixture(scope="module")
def both():
    return _run(0, 1), run_distributed(_run, 2)


@pytest.fixture(params=[False, True], ids=["single_crop", "multi_crop"])
def runs(both, request):
    one, two = both
    return one[request.param], [t[request.param] for t in two]


def test_memory_identical_on_ranks_and_equal_to_one_process(runs):
    one, two = runs
    for s in range(3):
        assert torch.equal(two[0]["W"][s], two[1]["W"][s]) and torch.equal(two[0]["v"][s], two[1]["v"][s])
        torch.testing.assert_close(two[0]["W"][s], one["W"][s], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(two[0]["v"][s], one["v"][s], rtol=1e-5, atol=1e-6)
        # the loss is a local-batch mean: its rank average is the single-process loss
        assert (two[0]["loss"][s] + two[1]["loss"][s]).item() / 2 == pytest.approx(one["loss"][s].item(), rel=1e-5)
    assert not torch.equal(one["W"][0], one["W"][2])


def test_ad_init_writes_gathered_keys_in_rank_order(runs):
    one, two = runs
    assert one["filled"] == two[0]["filled"] == two[1]["filled"] == 12  # 4 + 8 keys, truncated at K=12
    assert torch.equal(two[0]["W_init"], two[1]["W_init"])
    torch.testing.assert_close(two[0]["W_init"], one["W_init"], rtol=1e-5, atol=1e-6)
