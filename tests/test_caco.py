"""CaCo pieces against slow loop / autograd references written from sogclr_caco.md Part B."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from src.engine.hooks import StepInfo
from src.errors import UserError
from src.methods.caco import (
    CaCo,
    CaCoEpochLR,
    crop_pairs,
    lr_at_epoch,
    memory_grad,
    memory_lr_at_epoch,
    memory_step_,
    momentum_at_epoch,
    normalized_memory,
    pair_loss,
    select_positives,
)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ----------------------------------------------------------------------------- loop references
def ref_argmax(key, W):
    best, best_s = -1, -math.inf
    for k in range(W.shape[1]):
        s = sum(key[c] * W[c, k] for c in range(W.shape[0])) / math.sqrt(sum(W[c, k] ** 2 for c in range(W.shape[0])))
        if s > best_s:
            best, best_s = k, s
    return best


def ref_ce(z, W, y, T):
    """mean_n [−l_{n,y}/T + log Σ_k exp(l_{n,k}/T)], l = cosine(z_n, W_k)."""
    tot = 0.0
    for n in range(z.shape[0]):
        ls = [float(z[n] @ W[:, k] / W[:, k].norm()) / T for k in range(W.shape[1])]
        m = max(ls)
        tot += -ls[int(y[n])] + m + math.log(sum(math.exp(x - m) for x in ls))
    return tot / z.shape[0]


def test_positive_selection_and_summed_symmetric_loss_match_loop():
    N, C, K, T = 5, 6, 7, 0.08
    W = torch.randn(C, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    qt, kt, q, k = unit(N, C, seed=2), unit(N, C, seed=3), unit(N, C, seed=4), unit(N, C, seed=5)
    Dn = normalized_memory(W)
    y1, y2 = select_positives(k, Dn), select_positives(q, Dn)
    assert y1.tolist() == [ref_argmax(k[n], W) for n in range(N)]
    assert y2.tolist() == [ref_argmax(q[n], W) for n in range(N)]
    # labels are listed in key-crop order (view 1's key q, view 2's key k)
    loss = pair_loss([qt @ Dn, kt @ Dn], [y2, y1], crop_pairs(2, multi_crop=False), T)
    # swapped views: q̃ is supervised by k's slot, k̃ by q's; the two CEs are SUMMED
    assert loss.item() == pytest.approx(ref_ce(qt, W, y1, T) + ref_ce(kt, W, y2, T), rel=1e-9)


def test_multicrop_pairs_average_big_and_small_groups():
    pairs = crop_pairs(8, multi_crop=True)
    big = [(i, j) for i, j, w in pairs if i < 2]
    small = [(i, j) for i, j, w in pairs if i >= 2]
    assert big == [(0, 1), (1, 0)] and len(small) == 12 and all(i != j for i, j, _ in pairs)
    assert {w for i, _, w in pairs if i < 2} == {0.5} and {w for i, _, w in pairs if i >= 2} == {1 / 12}
    assert crop_pairs(2, multi_crop=True) == [(0, 1, 0.5), (1, 0, 0.5)]  # no small crops: the big mean only
    N, C, K, T = 4, 5, 6, 0.1
    W = torch.randn(C, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Dn = normalized_memory(W)
    zs = [unit(N, C, seed=10 + i) for i in range(8)]
    ys = [select_positives(unit(N, C, seed=30 + j), Dn) for j in range(2)]
    loss = pair_loss([z @ Dn for z in zs], ys, pairs, T)
    ref = (ref_ce(zs[0], W, ys[1], T) + ref_ce(zs[1], W, ys[0], T)) / 2
    ref += sum(ref_ce(zs[i], W, ys[j], T) for i in range(2, 8) for j in range(2)) / 12
    assert loss.item() == pytest.approx(ref, rel=1e-9)


# ----------------------------------------------------------------------------- memory step vs autograd
def autograd_memory_grad(zs, ys, pairs, W, T_mem):
    """Per sample n of each pair: ∇_W CE(z_n·D̂/τ_m, y_n) by autograd through the normalisation;
    the columns other than y_n (negatives) get their sign flipped (they ascend the loss), the positive
    column keeps it (it descends). Mean over the batch, weighted sum over pairs."""
    g = torch.zeros_like(W)
    for i, j, w in pairs:
        z, y = zs[i], ys[j]
        for n in range(z.shape[0]):
            Wl = W.clone().requires_grad_(True)
            ce = F.cross_entropy((z[n:n + 1] @ F.normalize(Wl, dim=0)) / T_mem, y[n:n + 1])
            (grad,) = torch.autograd.grad(ce, Wl)
            sign = -torch.ones(W.shape[1], dtype=W.dtype)
            sign[y[n]] = 1.0
            g += w * grad * sign / z.shape[0]
    return g


@pytest.mark.parametrize("multi_crop,n_crops", [(False, 2), (True, 4)])
def test_memory_update_matches_autograd_reference_over_steps_with_momentum(multi_crop, n_crops):
    N, C, K, T_mem, mu, lr = 6, 5, 9, 0.08, 0.9, 3.0
    W = torch.randn(C, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    v = torch.zeros_like(W)
    W_ref, v_ref = W.clone(), v.clone()
    pairs = crop_pairs(n_crops, multi_crop)
    for step in range(3):
        zs = [unit(N, C, seed=100 * step + i) for i in range(n_crops)]
        keys = [unit(N, C, seed=100 * step + 50 + j) for j in range(2)]
        Dn = normalized_memory(W)
        ys = [select_positives(k, Dn) for k in keys]
        g = memory_grad(zs, [z @ Dn for z in zs], ys, pairs, W, T_mem)
        g_ref = autograd_memory_grad(zs, ys, pairs, W_ref, T_mem)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-10)
        memory_step_(W, v, g, mu, lr)
        v_ref = mu * v_ref + g_ref
        W_ref = W_ref - lr * v_ref
        torch.testing.assert_close(W, W_ref, rtol=1e-5, atol=1e-10)
    assert not torch.allclose(W, torch.randn(C, K, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2)


def test_memory_directions_negatives_ascend_positive_descends():
    """One query, one step at τ_m: moving only the negative columns raises the loss (adversarial),
    moving only the positive column lowers it (cooperative); both kinds turn toward the query."""
    C, K, T = 4, 5, 0.5
    W = torch.randn(C, K, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = unit(1, C, seed=7)
    y = torch.tensor([2])
    loss = lambda M: F.cross_entropy(z @ normalized_memory(M) / T, y).item()  # noqa: E731
    g = memory_grad([z, z], [z @ normalized_memory(W)] * 2, [y, y], [(0, 1, 1.0)], W, T)
    W2, v = W.clone(), torch.zeros_like(W)
    memory_step_(W2, v, g, 0.9, 0.01)
    neg_only, pos_only = W.clone(), W.clone()
    neg_only[:, [0, 1, 3, 4]] = W2[:, [0, 1, 3, 4]]
    pos_only[:, 2] = W2[:, 2]
    assert loss(neg_only) > loss(W) > loss(pos_only)
    assert ((z @ normalized_memory(W2)) > (z @ normalized_memory(W))).all()
    # the tangent projection: the update of column k is orthogonal to d̂_k
    assert torch.allclose((g * normalized_memory(W)).sum(0), torch.zeros(K, dtype=W.dtype), atol=1e-12)


# ----------------------------------------------------------------------------- schedules (B3)
def test_encoder_lr_schedule_hand_values():
    init = 0.3 * 1024 / 256  # README: 1.2
    s = CaCoEpochLR(init, 0.3, 0.003, 200, 10)
    assert s(0, 5, 100) == pytest.approx(0.12) and s(9) == pytest.approx(1.2)
    assert s(10) == pytest.approx(1.2)                          # cosine starts at init_lr
    assert s(105) == pytest.approx(0.012 + 0.5 * (1.2 - 0.012))  # half way: the mean of 1.2 and 0.012
    assert s(200) == pytest.approx(0.012)                       # lr_final 0.003 x 1024/256
    assert lr_at_epoch(3, 1.0, 0.1, 0.01, 10, 0) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.3)) * 0.9)


def test_memory_lr_and_momentum_schedules_hand_values():
    assert memory_lr_at_epoch(0, 3.0, 3.0, 200, 10) == pytest.approx(0.3)
    assert memory_lr_at_epoch(9, 3.0, 3.0, 200, 10) == pytest.approx(3.0)
    assert memory_lr_at_epoch(150, 3.0, 3.0, 200, 10) == 3.0      # equal ends: constant, not scaled
    assert memory_lr_at_epoch(105, 3.0, 0.03, 200, 10) == pytest.approx(1.515)
    assert memory_lr_at_epoch(200, 3.0, 0.03, 200, 10) == pytest.approx(0.03)
    assert momentum_at_epoch(0, 0.99, 200, True) == pytest.approx(0.99)
    assert momentum_at_epoch(100, 0.99, 200, True) == pytest.approx(0.995)
    assert momentum_at_epoch(200, 0.99, 200, True) == pytest.approx(1.0)
    assert momentum_at_epoch(100, 0.99, 200, False) == 0.99


# ----------------------------------------------------------------------------- the module
def tiny_caco(**kw) -> CaCo:
    torch.manual_seed(0)
    args = dict(dim=8, mlp_dim=16, K=12, moco_t=0.2, mem_t=0.1, moco_m=0.9, epochs=4, warmup_epochs=1,
                memory_lr=2.0, memory_lr_final=2.0, ad_init_lr=0.05)
    args.update(kw)
    return CaCo("resnet18", **args)


def crops(n=2, B=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, size, size, generator=g) for _ in range(n)]


def test_architecture_and_initial_memory():
    m = tiny_caco()
    fc = m.encoder_q.fc
    assert [type(x).__name__ for x in fc] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(x.bias is None for x in fc if isinstance(x, torch.nn.Linear))
    assert not any(p.requires_grad for p in m.encoder_k.parameters())
    # no zero-init residual: the last BN of each block keeps weight 1
    assert torch.equal(m.encoder_q.layer1[0].bn2.weight, torch.ones_like(m.encoder_q.layer1[0].bn2.weight))
    assert torch.equal(m.W, tiny_caco().W) and m.W.std() > 0.5 and not m.v.any()  # same W on every rank


def test_forward_updates_ema_before_the_keys_and_caches_pre_step_outputs():
    m = tiny_caco()
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(0.01)
    k_before = [p.clone() for p in m.encoder_k.parameters()]
    q_params = [p.clone() for p in m.encoder_q.parameters()]
    m.on_epoch_start(0)
    out = m(crops(), torch.arange(4))
    for pk, pk0, pq in zip(m.encoder_k.parameters(), k_before, q_params):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)
    _, logits, labels, pairs = m._cache
    assert pairs == [(0, 1, 1.0), (1, 0, 1.0)] and logits[0].shape == (4, 12)
    expected = pair_loss(logits, labels, pairs, 0.2)
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert set(out) == {"loss", "acc1", "acc5", "mem_pos_prob"}


def test_after_step_applies_memory_update_and_skips_when_step_not_applied():
    m = tiny_caco()
    m.on_epoch_start(2)
    m(crops(), torch.arange(4))
    W0, v0 = m.W.clone(), m.v.clone()
    m.after_step(StepInfo(0, 0, 0, 0.1, applied=False))
    assert torch.equal(m.W, W0) and torch.equal(m.v, v0) and m._cache is None
    m.after_step(StepInfo(0, 0, 0, 0.1, applied=True))  # cache consumed: still nothing
    assert torch.equal(m.W, W0)
    m(crops(), torch.arange(4))
    z, logits, labels, pairs = m._cache
    g = memory_grad(z, logits, labels, pairs, W0, 0.1)
    m.after_step(StepInfo(0, 0, 0, 0.1, applied=True))
    torch.testing.assert_close(m.v, g)
    torch.testing.assert_close(m.W, W0 - 2.0 * g)


def test_fp16_overflow_skip_through_the_engine_step_leaves_memory_unchanged():
    """The engine's TrainStep with loss scaling on the CPU: an overflowing loss makes GradScaler skip
    the optimizer step (applied False), and the memory step is skipped with it; a finite step applies."""
    from src.engine.step import TrainStep
    m = tiny_caco()
    m.on_epoch_start(2)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    step = TrainStep(opt, torch.device("cpu"), force_scaler=True)
    W0, v0, p0 = m.W.clone(), m.v.clone(), [p.clone() for p in m.encoder_q.parameters()]

    def overflow():
        out = m(crops(), torch.arange(4))
        return {**out, "loss": out["loss"] * float("inf")}
    _, info = step(overflow, 0.1, 2, 0, 0)
    m.after_step(info)
    assert info.applied is False and torch.equal(m.W, W0) and torch.equal(m.v, v0)
    assert all(torch.equal(a, b) for a, b in zip(m.encoder_q.parameters(), p0))
    _, info = step(lambda: m(crops(), torch.arange(4)), 0.1, 2, 1, 1)
    m.after_step(info)
    assert info.applied is True and not torch.equal(m.W, W0) and m.v.abs().sum() > 0


class FakeContext:
    """What ``FitContext`` offers ``on_fresh_start``: batches, forward, a plain SGD step, log."""

    def __init__(self, method, n_batches, B=4):
        self.method, self.n, self.B = method, n_batches, B
        self.opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.0)
        self.steps, self.keys = 0, []

    warmup_state = None

    def batches(self, epoch=0, start=0):
        for i in range(start, self.n):
            yield crops(2, self.B, seed=i), torch.zeros(self.B), torch.arange(self.B)

    def stop_point(self, next_iter, state):
        pass

    def forward(self, c, index, **kw):
        return self.method(c, index, **kw)

    def step(self, loss_fn, lr, iteration):
        for g in self.opt.param_groups:
            g["lr"] = lr
        out = loss_fn()
        self.keys.append(self.method._init_keys.clone())
        self.opt.zero_grad()
        out["loss"].backward()
        self.opt.step()
        self.steps += 1
        return {k: v.detach() for k, v in out.items()}, StepInfo(0, 0, 0, 0.1, applied=True)

    def log(self, metrics, prefix="warmup/"):
        pass


@pytest.mark.parametrize("K,steps", [(12, 3), (10, 3)])
def test_ad_init_fills_exactly_K_columns_then_copies_q_to_k(K, steps):
    m = tiny_caco(K=K)
    W0 = m.W.clone()
    ctx = FakeContext(m, n_batches=6)
    m.on_fresh_start(ctx)
    assert ctx.steps == steps  # stops once K columns are filled
    keys = torch.cat(ctx.keys)[:K]
    torch.testing.assert_close(m.W, keys.T)
    assert not torch.equal(m.W, W0[:, :K])
    for pk, pq in zip(m.encoder_k.parameters(), m.encoder_q.parameters()):
        assert torch.equal(pk, pq)
    assert ctx.opt.param_groups[0]["lr"] == 0.05 and m._cache is None


def test_ad_init_logits_use_the_partly_filled_memory():
    m = tiny_caco()
    c = crops()
    out = m(c, torch.arange(4), phase="ad_init")
    q = F.normalize(m.encoder_q(c[0]), dim=1)  # train-mode BN: same batch, same output
    k = m._init_keys
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ normalized_memory(m.W)], 1) / 0.2
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)))


def test_ad_init_off_and_too_small_epoch():
    m = tiny_caco(ad_init=False)
    W0 = m.W.clone()
    ctx = FakeContext(m, n_batches=6)
    m.on_fresh_start(ctx)
    assert ctx.steps == 0 and torch.equal(m.W, W0)
    m = tiny_caco(K=40)
    with pytest.raises(UserError, match="filled only 24 of the 40"):
        m.on_fresh_start(FakeContext(m, n_batches=6))


def test_checkpoint_items_and_official_memory_bank():
    m = tiny_caco()
    with torch.no_grad():
        m.W.add_(1.0)
        m.v.add_(0.5)
    items = m.extra_checkpoint_items()
    assert set(items["Memory_Bank"]) == {"W", "v"} and torch.equal(items["Memory_Bank"]["W"], m.W)
    sd = {k: v for k, v in m.state_dict().items() if k not in ("W", "v")}  # the official state_dict
    n = tiny_caco()
    restored = n.state_dict_from_checkpoint(sd, {"Memory_Bank": items["Memory_Bank"], "best_acc": 12.5})
    n.load_state_dict(restored, strict=True)
    assert torch.equal(n.W, m.W) and torch.equal(n.v, m.v) and n.best_acc == 12.5
