"""PCL in 1 process vs 2 gloo processes (disco_pcl_evals.md B4, B5): the E-step gives every rank the
clustering a single process computes (features gathered by index, BN statistics averaged over the
ranks, k-means on rank 0, broadcast), and each rank's ProtoNCE loss equals the single-process loss
of the same images with the same draws."""
from __future__ import annotations

import torch
import torch.distributed as dist

from src import distributed as D
from src.methods.pcl import PCL
from tests.dist_utils import run_distributed

N_DATA, KS, R = 24, [13, 16], 8


class RandImages(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randn(N_DATA, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return N_DATA

    def __getitem__(self, i):
        return self.x[i], 0, i


class Ctx:
    resumed_mid_epoch = False

    @staticmethod
    def should_stop():
        return False


def _bns(m):
    return [b for b in m.encoder_k.modules() if isinstance(b, torch.nn.BatchNorm2d)]


def _method(rank: int, world: int) -> PCL:
    torch.manual_seed(0)
    m = PCL("resnet18", N_DATA, KS, dim=8, r=R, T=0.2, warmup_epoch=0)
    m.set_eval_data(RandImages(), 5, 0)
    # different BN statistics on each rank, whose mean is the single-process value (exact in float)
    mean, var = ((-0.25, 1.5), (0.25, 0.5))[rank] if world == 2 else (0.0, 1.0)
    for b in _bns(m):
        b.running_mean.fill_(mean)
        b.running_var.fill_(var)
    return m


def _run(rank: int, world: int) -> dict:
    m = _method(rank, world)
    m.on_epoch_start(0, Ctx())
    out = {"clusters": [tuple(t.clone() for t in m.clustering(i)) for i in range(len(KS))],
           "bn_untouched": all(float(b.running_mean[0]) == (0.0 if world == 1 else (-0.25, 0.25)[rank]) for b in _bns(m))}
    for b in _bns(m):  # same key encoder everywhere for the loss
        b.running_mean.fill_(0.0)
        b.running_var.fill_(1.0)
    m.eval()  # running-stat BN: the keys do not depend on how the batch is split
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)]
    idx = torch.tensor([3, 17, 4, 9, 22, 0, 11, 5])
    halves = [rank] if world == 2 else [0, 1]
    out["loss"] = []
    for h in halves:
        import copy
        mh = copy.deepcopy(m) if world == 1 else m
        sl = slice(4 * h, 4 * h + 4)
        torch.manual_seed(100)
        if world == 1:  # draw the negatives as rank h of 2 would
            orig = D.get_world_size, D.get_rank
            D.get_world_size, D.get_rank = (lambda: 2), (lambda: h)
        try:
            res = mh([x[0][sl], x[1][sl]], idx[sl])
        finally:
            if world == 1:
                D.get_world_size, D.get_rank = orig
        out["loss"].append({k: v.detach().clone() for k, v in res.items()})
    if world == 2:
        dist.barrier()
    return out


def test_estep_and_loss_one_vs_two_processes():
    one = _run(0, 1)
    two = run_distributed(_run, 2)
    for i in range(len(KS)):
        a1, c1, p1 = one["clusters"][i]
        for r in range(2):
            a2, c2, p2 = two[r]["clusters"][i]
            assert torch.equal(a2, a1), (i, r)
            assert torch.allclose(c2, c1, atol=1e-5) and torch.allclose(p2, p1, rtol=1e-5)
        assert torch.equal(two[0]["clusters"][i][1], two[1]["clusters"][i][1])  # broadcast: bitwise equal
        assert torch.allclose(c1.norm(dim=1), torch.ones(KS[i]), atol=1e-5)
        assert abs(p1.mean().item() - 0.2) < 1e-5
    assert one["bn_untouched"] and two[0]["bn_untouched"] and two[1]["bn_untouched"]
    for r in range(2):
        for key in ("loss", "loss_inst", "loss_proto"):
            assert torch.allclose(two[r]["loss"][0][key], one["loss"][r][key], rtol=1e-5), (r, key)
    assert "loss_proto" in one["loss"][0] and one["loss"][0]["loss_proto"] > 0
