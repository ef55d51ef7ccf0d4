"""LARC (apex semantics, moco_m_lorac.md §3.1) and the SwAV per-iteration schedule (§3.2)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src.optim import LARC, SwAVCosineLR


def ref_larc_step(params, grads, bufs, lr, wd, momentum=0.9, eta=0.001, eps=1e-8):
    """Spec §3.1 in float64: if ‖p‖≠0 and ‖g‖≠0: a = η‖p‖/(‖g‖ + wd‖p‖ + eps), g ← (g + wd p)·a;
    else g stays raw (no wd, no scaling). Then SGD: v ← μv + g (v = g at the first step), p ← p − lr v."""
    out_p, out_b = [], []
    for p, g, v in zip(params, grads, bufs):
        pn, gn = np.linalg.norm(p), np.linalg.norm(g)
        if pn != 0 and gn != 0:
            a = eta * pn / (gn + wd * pn + eps)
            g = (g + wd * p) * a
        v = g.copy() if v is None else momentum * v + g
        out_p.append(p - lr * v)
        out_b.append(v)
    return out_p, out_b


def make_params():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=g))
    bias0 = torch.nn.Parameter(torch.zeros(4))          # zero norm (zero-initialised BN bias)
    v = torch.nn.Parameter(torch.randn(5, generator=g))  # will get a zero gradient
    frozen = torch.nn.Parameter(torch.randn(2, generator=g))  # never has a grad (encoder_k)
    return [w, bias0, v, frozen]


def grads_at(step):
    g = torch.Generator().manual_seed(10 + step)
    return [torch.randn(4, 3, generator=g), torch.randn(4, generator=g), torch.zeros(5), None]


@pytest.mark.parametrize("scale", [None, 1024.0])
def test_larc_matches_reference(scale):
    lr, wd = 1.8, 1e-6
    ps = make_params()
    opt = LARC(ps, lr=lr, momentum=0.9, weight_decay=wd)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
    ref_p = [p.detach().double().numpy().copy() for p in ps[:3]]
    ref_b = [None] * 3
    frozen0 = ps[3].detach().clone()
    for step in range(4):
        gs = grads_at(step)
        opt.zero_grad(set_to_none=True)
        loss = sum((p * g).sum() for p, g in zip(ps, gs) if g is not None)   # ∂loss/∂p = g
        scaler.scale(loss).backward()
        if scale:
            assert torch.allclose(ps[0].grad, gs[0] * scale)
            scaler.unscale_(opt)     # the engine unscales before LARC (not scale invariant)
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        ref_p, ref_b = ref_larc_step(ref_p, [g.double().numpy() for g in gs[:3]], ref_b, lr, wd)
        for p, r in zip(ps[:3], ref_p):
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-5, atol=1e-6)
    assert torch.equal(ps[3], frozen0)
    assert opt.param_groups[0]["weight_decay"] == wd   # restored after each step


def test_larc_zero_norm_quirk_first_step():
    """A zero parameter takes a raw plain-SGD step on iteration 0 (no trust ratio, no wd)."""
    b = torch.nn.Parameter(torch.zeros(3))
    opt = LARC([b], lr=1.8, momentum=0.9, weight_decay=1e-6)
    b.grad = torch.tensor([0.5, -1.0, 2.0])
    opt.step()
    assert torch.allclose(b.detach(), -1.8 * torch.tensor([0.5, -1.0, 2.0]))
    # second step: now ‖p‖ ≠ 0, scaled by η‖p‖/(‖g‖+wd‖p‖+eps)
    g = torch.tensor([0.1, 0.2, 0.3])
    p0 = b.detach().clone()
    buf = torch.tensor([0.5, -1.0, 2.0])
    b.grad = g.clone()
    opt.step()
    a = 0.001 * p0.norm() / (g.norm() + 1e-6 * p0.norm() + 1e-8)
    want = p0 - 1.8 * (0.9 * buf + (g + 1e-6 * p0) * a)
    assert torch.allclose(b.detach(), want, atol=1e-6)


def test_larc_unscale_matters():
    """Without unscaling, a 1024× gradient gives a different step (wd and eps break scale invariance)."""
    p1, p2 = torch.nn.Parameter(torch.ones(3) * 1e-3), torch.nn.Parameter(torch.ones(3) * 1e-3)
    g = torch.tensor([1e-6, 2e-6, -1e-6])
    for p, s in ((p1, 1.0), (p2, 1024.0)):
        opt = LARC([p], lr=1.0, weight_decay=0.1)
        p.grad = g * s
        opt.step()
    assert not torch.allclose(p1, p2)


def official_schedule(base, final, epochs, warmup, start, n):
    """SwAV / LORAC ``main_*.py``: numpy linspace warmup + cosine array, indexed by epoch·n + it."""
    w = np.linspace(start, base, n * warmup)
    iters = np.arange(n * (epochs - warmup))
    c = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / (n * (epochs - warmup)))) for t in iters])
    return np.concatenate((w, c))


@pytest.mark.parametrize("warmup,n", [(0, 7), (2, 5), (1, 1), (3, 2)])
def test_swav_cosine_matches_official_array(warmup, n):
    epochs, base, final, start = 6, 1.8, 0.018, 0.3
    ref = official_schedule(base, final, epochs, warmup, start, n)
    s = SwAVCosineLR(base, final, epochs, warmup, start)
    got = [s(e, it, n) for e in range(epochs) for it in range(n)]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    if warmup == 0:
        assert got[0] == base and got[-1] > final


def test_seed_schedule_endpoints():
    s = SwAVCosineLR(1.8, 0.018, 200, 0, 0.0)
    assert s(0, 0, 5004) == 1.8
    assert s(100, 0, 5004) == pytest.approx(0.018 + 0.5 * (1.8 - 0.018))
