"""Optimisers and learning-rate schedules shared by the methods.

- :class:`LARC`: apex ``LARC`` semantics over SGD (LORAC/MoCo-M, CaCo's linear probe).
- :class:`LARS`: MoCo v3 semantics (SogCLR, CaCo).
- Schedules are callables ``lr(epoch, it, iters_per_epoch) -> float``; the engine writes the value
  into every param group at the start of each iteration (per-epoch schedules ignore ``it``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.optim import SGD, Optimizer


class LARC(SGD):
    """SGD wrapped in apex ``LARC(trust_coefficient, clip, eps)`` (moco_m_lorac.md §3.1).

    For every parameter with a gradient, if ‖p‖ ≠ 0 and ‖g‖ ≠ 0:
        a = η‖p‖ / (‖g‖ + wd‖p‖ + eps)   (clip mode: a ← min(a / lr, 1))
        g ← (g + wd·p)·a
    otherwise the gradient is left raw: **no weight decay and no scaling** (apex quirk, kept).
    Then the plain SGD step with weight decay 0. All parameters take part (no BN/bias exclusion).
    Under fp16 call ``GradScaler.unscale_`` before ``step`` (the rule is not scale invariant).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, clip: bool = False, eps: float = 1e-8, nesterov: bool = False):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.trust_coefficient, self.clip, self.eps = trust_coefficient, clip, eps

    @torch.no_grad()
    def step(self, closure=None):
        wds = []
        for group in self.param_groups:
            wd = group["weight_decay"]
            wds.append(wd)
            group["weight_decay"] = 0.0
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            grads = [p.grad for p in ps]
            pn = torch._foreach_norm(ps)
            gn = torch._foreach_norm(grads)
            for p, g, a_p, a_g in zip(ps, grads, pn, gn):
                ok = (a_p != 0) & (a_g != 0)
                ratio = self.trust_coefficient * a_p / (a_g + a_p * wd + self.eps)
                if self.clip:
                    ratio = torch.clamp(ratio / group["lr"], max=1.0)
                # where a norm is zero: ratio 1 and no weight decay (the gradient stays raw)
                scale = torch.where(ok, ratio, torch.ones_like(ratio))
                g.add_(p * torch.where(ok, torch.full_like(ratio, wd), torch.zeros_like(ratio)))
                g.mul_(scale)
        try:
            return super().step(closure)
        finally:
            for group, wd in zip(self.param_groups, wds):
                group["weight_decay"] = wd


class LARS(Optimizer):
    """MoCo v3 LARS (sogclr_caco.md A3): for params with ndim > 1, d = g + wd·p and
    d ← d·η‖p‖/‖d‖ (factor 1 if either norm is 0); params with ndim ≤ 1 get neither weight decay
    nor adaptation. Then heavy-ball momentum μ (no dampening) and p ← p − lr·μ-buffer."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    q = torch.where(pn > 0, torch.where(un > 0, g["trust_coefficient"] * pn / un,
                                                        torch.ones_like(pn)), torch.ones_like(pn))
                    dp = dp.mul(q)
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                mu = st["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


# ----------------------------------------------------------------------------- schedules
class MoCoEpochLR:
    """MoCo v2 ``adjust_learning_rate``: per epoch; ``cos``: lr·½(1+cos(π·epoch/epochs)),
    else ×``gamma`` at each milestone in ``schedule`` (MoCo: 0.1 at 120, 160)."""

    def __init__(self, base_lr: float, epochs: int, cos: bool, schedule: Sequence[int] = (120, 160),
                 gamma: float = 0.1):
        self.base_lr, self.epochs, self.cos, self.schedule, self.gamma = base_lr, epochs, cos, list(schedule), gamma

    def __call__(self, epoch: int, it: int = 0, iters: int = 1) -> float:
        if self.cos:
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return self.base_lr * self.gamma ** sum(epoch >= m for m in self.schedule)


class SwAVCosineLR:
    """SwAV/LORAC per-iteration schedule (moco_m_lorac.md §3.2): linear warmup
    ``linspace(start_warmup, base_lr, n·warmup_epochs)`` then
    lr_t = final + ½(base − final)(1 + cos(π t / T)), T = n·(epochs − warmup_epochs)."""

    def __init__(self, base_lr: float, final_lr: float, epochs: int, warmup_epochs: int = 0,
                 start_warmup: float = 0.0):
        self.base_lr, self.final_lr, self.epochs = base_lr, final_lr, epochs
        self.warmup_epochs, self.start_warmup = warmup_epochs, start_warmup

    def __call__(self, epoch: int, it: int, iters: int) -> float:
        t = epoch * iters + it
        nw = iters * self.warmup_epochs
        if t < nw:  # numpy.linspace(start, base, nw)[t]
            return self.start_warmup + (self.base_lr - self.start_warmup) * (t / (nw - 1) if nw > 1 else 0.0)
        T = iters * (self.epochs - self.warmup_epochs)
        return self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1 + math.cos(math.pi * (t - nw) / T))


class WarmupCosineLR:
    """MoCo v3 / SogCLR per-iteration schedule (sogclr_caco.md A3): with t = epoch + it/iters,
    lr·t/warmup during warmup, then lr·½(1 + cos(π (t − warmup)/(epochs − warmup))) down to 0."""

    def __init__(self, base_lr: float, epochs: int, warmup_epochs: float):
        self.base_lr, self.epochs, self.warmup_epochs = base_lr, epochs, warmup_epochs

    def __call__(self, epoch: int, it: int, iters: int) -> float:
        t = epoch + it / iters
        if t < self.warmup_epochs:
            return self.base_lr * t / self.warmup_epochs
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * (t - self.warmup_epochs) /
                                                     (self.epochs - self.warmup_epochs)))

