"""DisCo's distillation and RKD losses against loop references written from the spec (A3, A6)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.methods.disco import (disco_distill_loss, distill_mse, pairwise_distances, rkd_angle_loss,
                               rkd_distance_loss)


def _emb(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_mse(s, t, reduction):
    """Σ_i Σ_c (t_ic − s_ic)²  (sum) or that divided by N (mean)."""
    tot = 0.0
    for i in range(s.shape[0]):
        for c in range(s.shape[1]):
            tot += (float(t[i, c]) - float(s[i, c])) ** 2
    return tot if reduction == "sum" else tot / s.shape[0]


def ref_rkd_distance(s, t):
    n = s.shape[0]

    def dist(e):
        d = [[0.0 if i == j else math.sqrt(max(sum((float(e[i, c]) - float(e[j, c])) ** 2 for c in range(e.shape[1])), 1e-12))
              for j in range(n)] for i in range(n)]
        pos = [x for row in d for x in row if x > 0]
        mu = sum(pos) / len(pos)
        return [[x / mu for x in row] for row in d]
    ds, dt = dist(s), dist(t)
    return sum(_smooth_l1(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n ** 2


def ref_rkd_angle(s, t):
    n = s.shape[0]

    def unit(v):
        nv = math.sqrt(sum(x * x for x in v))
        return [x / max(nv, 1e-12) for x in v]

    def angle(e, a, b, c):
        u = unit([float(e[b, k] - e[a, k]) for k in range(e.shape[1])])
        v = unit([float(e[c, k] - e[a, k]) for k in range(e.shape[1])])
        return sum(x * y for x, y in zip(u, v))
    tot = 0.0
    for a in range(n):
        for b in range(n):
            for c in range(n):
                tot += _smooth_l1(angle(s, a, b, c) - angle(t, a, b, c))
    return tot / n ** 3


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_distill_mse_matches_loop(reduction):
    s, t = _emb(seed=1), _emb(seed=2)
    assert float(distill_mse(s, t, reduction)) == pytest.approx(ref_mse(s, t, reduction), rel=1e-10)


def test_distill_sum_is_official_mseloss_sum_and_2_minus_2cos():
    s, t = _emb(8, 128, 3), _emb(8, 128, 4)
    official = torch.nn.MSELoss(reduction="sum")(t, s)
    assert torch.allclose(distill_mse(s, t, "sum"), official)
    assert torch.allclose(distill_mse(s, t, "sum"), (2 - 2 * (s * t).sum(1)).sum())
    # "mean" is per sample, not per element (F.mse_loss would divide by 128 more)
    assert torch.allclose(distill_mse(s, t, "mean") * 8, official)


def test_both_views_same_view_pairing_and_weight():
    s1, t1, s2, t2 = (_emb(seed=i) for i in range(4))
    got = disco_distill_loss(s1, t1, s2, t2, "sum", weight=0.5)
    want = 0.5 * (ref_mse(s1, t1, "sum") + ref_mse(s2, t2, "sum"))
    assert float(got) == pytest.approx(want, rel=1e-10)
    crossed = 0.5 * (ref_mse(s1, t2, "sum") + ref_mse(s2, t1, "sum"))
    assert abs(float(got) - crossed) > 1e-3
    got_mean = disco_distill_loss(s1, t1, s2, t2, "mean", weight=32.0)
    assert float(got_mean) == pytest.approx(32.0 * (ref_mse(s1, t1, "mean") + ref_mse(s2, t2, "mean")), rel=1e-10)


def test_distill_gradient_flows_to_the_student_only():
    s = _emb().requires_grad_(True)
    t = _emb(seed=5).requires_grad_(True)
    distill_mse(s, t).backward()
    assert s.grad is not None and t.grad is None
    assert torch.allclose(s.grad, 2 * (s - t).detach())


def test_rkd_distance_matches_loop():
    s, t = _emb(5, 4, 6), _emb(5, 4, 7)
    assert float(rkd_distance_loss(s, t)) == pytest.approx(ref_rkd_distance(s, t), rel=1e-9)
    d = pairwise_distances(s)
    assert torch.all(d.diagonal() == 0) and torch.allclose(d, d.t())


def test_rkd_angle_matches_loop_with_a_duplicate_row():
    s, t = _emb(4, 3, 8), _emb(4, 3, 9)
    s[3] = s[1]  # a zero difference vector stays zero (not NaN)
    got = rkd_angle_loss(s, t)
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(ref_rkd_angle(s, t), rel=1e-9)


def test_rkd_teacher_side_has_no_gradient():
    s = _emb(5, 4, 10).requires_grad_(True)
    t = _emb(5, 4, 11).requires_grad_(True)
    (rkd_distance_loss(s, t) + rkd_angle_loss(s, t)).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
