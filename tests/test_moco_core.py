"""MoCo building blocks against slow, obviously-correct references (specs/moco_m_lorac.md §7)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from src.methods.moco import MoCo, moco_logits, moco_loss
from src.models.momentum import momentum_update_, shuffle_bn_forward
from src.models.queue import enqueue_, init_queue
from tests.dist_utils import run_distributed


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_infonce_with_queue_matches_loop_reference():
    N, C, K, T = 5, 8, 11, 0.2
    q, k = _unit(N, C, seed=1), _unit(N, C, seed=2)
    queue = _unit(K, C, seed=3).T.contiguous()  # dim × K, unit columns
    loss, logits = moco_loss(q, k, queue, T)
    ref = 0.0
    for i in range(N):
        pos = sum(q[i, c] * k[i, c] for c in range(C)) / T
        negs = [sum(q[i, c] * queue[c, j] for c in range(C)) / T for j in range(K)]
        lse = math.log(math.exp(pos) + sum(math.exp(n) for n in negs))
        ref += (lse - pos) / N
        assert abs(logits[i, 0].item() - pos) < 1e-12
        assert all(abs(logits[i, 1 + j].item() - negs[j]) < 1e-12 for j in range(K))
    assert abs(loss.item() - ref) < 1e-12


def test_enqueue_wraps_around_and_keeps_order():
    dim, K = 3, 7
    queue = torch.zeros(dim, K)
    keys = torch.arange(5 * dim, dtype=torch.float32).view(5, dim) + 1
    enqueue_(queue, keys, ptr=4)  # columns 4,5,6,0,1
    for j, col in enumerate([4, 5, 6, 0, 1]):
        assert torch.equal(queue[:, col], keys[j])
    assert torch.equal(queue[:, 2], torch.zeros(dim)) and torch.equal(queue[:, 3], torch.zeros(dim))


def test_init_queue_unit_columns():
    q = init_queue(16, 32)
    assert q.shape == (16, 32)
    assert torch.allclose(q.norm(dim=0), torch.ones(32), atol=1e-6)
    q2 = init_queue(16, 32, planes=2)
    assert q2.shape == (2, 16, 32) and torch.allclose(q2.norm(dim=1), torch.ones(2, 32), atol=1e-6)


def test_momentum_update_is_ema_of_parameters_only():
    torch.manual_seed(0)
    src, tgt = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    tgt[1].running_mean.fill_(5.0)
    src[1].running_mean.fill_(-1.0)
    before = {n: p.clone() for n, p in tgt.named_parameters()}
    m = 0.9
    momentum_update_(tgt, src, m)
    for (n, p), (_, s) in zip(tgt.named_parameters(), src.named_parameters()):
        assert torch.allclose(p, before[n] * m + s * (1 - m), atol=1e-7)
    assert torch.all(tgt[1].running_mean == 5.0)  # buffers are not averaged


# ----------------------------------------------------------------------------- 1 vs 2 processes
def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4))


def _data(n=8):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(7))


def _shuffle_bn_rank(rank, world_size):
    net = _bn_net()
    x = _data()
    torch.manual_seed(123)  # the permutation comes from this stream on every rank
    out = shuffle_bn_forward(net, x.chunk(world_size)[rank])
    return out


def test_shuffle_bn_single_process_emulation_equals_two_gloo_processes():
    outs = run_distributed(_shuffle_bn_rank, 2)
    net = _bn_net()
    torch.manual_seed(123)
    single = shuffle_bn_forward(net, _data(), groups=2)
    assert torch.allclose(torch.cat(outs), single, atol=1e-6)
    # and it differs from a plain full-batch forward (BN statistics per group)
    assert not torch.allclose(single, _bn_net()(_data()), atol=1e-4)


def _enqueue_rank(rank, world_size, steps):
    torch.manual_seed(0)
    m = MoCo("resnet18", dim=4, K=12, mlp=False)
    for s in range(steps):
        keys = torch.full((2, 4), float(10 * s + rank + 1))  # 2 keys per rank per step
        m._dequeue_and_enqueue(keys)
    return {"queue": m.queue.clone(), "ptr": m.queue_ptr.clone()}


def test_queue_multi_rank_order_matches_single_process():
    res = run_distributed(_enqueue_rank, 2, 4)
    assert torch.equal(res[0]["queue"], res[1]["queue"]) and torch.equal(res[0]["ptr"], res[1]["ptr"])
    torch.manual_seed(0)
    single = MoCo("resnet18", dim=4, K=12, mlp=False)
    for s in range(4):  # the gathered batch is [rank0 keys; rank1 keys]
        keys = torch.cat([torch.full((2, 4), float(10 * s + r + 1)) for r in range(2)])
        single._dequeue_and_enqueue(keys)
    assert torch.equal(res[0]["queue"], single.queue)
    assert int(single.queue_ptr) == (4 * 4) % 12 == int(res[0]["ptr"])
    # after 4 steps of 4 keys in a queue of 12, step 3 overwrote columns 0..3 (wrap-around)
    assert torch.equal(single.queue[:, 0], torch.full((4,), 31.0))
    assert torch.equal(single.queue[:, 2], torch.full((4,), 32.0))


def test_moco_forward_uses_snapshot_and_updates_key_encoder():
    torch.manual_seed(0)
    m = MoCo("resnet18", dim=8, K=16, m=0.5, T=0.2, mlp=True, hidden=32, cifar_stem=True)
    x = torch.randn(4, 3, 16, 16)
    q0 = m.queue.clone()
    k_before = [p.clone() for p in m.encoder_k.parameters()]
    out = m([x, x.flip(-1)], torch.arange(4))
    assert out["loss"].requires_grad and math.isfinite(out["loss"].item())
    assert int(m.queue_ptr) == 4
    assert not torch.equal(m.queue[:, :4], q0[:, :4]) and torch.equal(m.queue[:, 4:], q0[:, 4:])
    # encoder_k started as a copy of encoder_q, so the EMA leaves it equal to encoder_q
    for a, b in zip(m.encoder_k.parameters(), m.encoder_q.parameters()):
        assert torch.allclose(a, b)
    assert all(torch.equal(a, b) for a, b in zip(k_before, m.encoder_k.parameters()))
    # DisCo --hidden: Linear(512, 32) → ReLU → Linear(32, 8)
    assert m.encoder_q.fc[0].weight.shape == (32, 512) and m.encoder_q.fc[2].weight.shape == (8, 32)
    logits = moco_logits(F.normalize(torch.randn(2, 8), dim=1), F.normalize(torch.randn(2, 8), dim=1), q0, 0.2)
    assert logits.shape == (2, 17)


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_ema_runs_before_the_key_forward_moco():
    """The keys enqueued by a step come from the key encoder *after* this step's EMA update."""
    import copy
    torch.manual_seed(0)
    m = MoCo("resnet18", dim=8, K=16, m=0.5, T=0.2, mlp=False, cifar_stem=True)
    _perturb(m.encoder_q, 1)  # make θ_q ≠ θ_k so that the order matters
    x = torch.randn(4, 3, 16, 16)
    k_enc = copy.deepcopy(m.encoder_k)
    momentum_update_(k_enc, m.encoder_q, 0.5)
    with torch.no_grad():
        expected = F.normalize(k_enc(x.flip(-1)), dim=1)
    m([x, x.flip(-1)], torch.arange(4))
    assert torch.allclose(m.queue[:, :4].T, expected, atol=1e-6)


def test_ema_runs_before_the_key_forward_mocom():
    import copy
    from src.methods.mocom import MoCoM
    torch.manual_seed(0)
    m = MoCoM("resnet18", dim=8, K=16, m=0.5, T=0.2, nmb_crops=(2, 1), cifar_stem=True)
    _perturb(m.encoder_q, 2)
    crops = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    k_enc = copy.deepcopy(m.encoder_k)
    momentum_update_(k_enc, m.encoder_q, 0.5)
    with torch.no_grad():
        expected = F.normalize(k_enc(torch.cat(crops[:2])), dim=1).view(2, 4, -1)
    _, k = m.embed(crops)
    assert torch.allclose(k, expected, atol=1e-6)
