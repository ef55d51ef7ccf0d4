"""Momentum (EMA) encoder and MoCo's shuffle-BN."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .. import distributed as D


def make_momentum_copy(encoder: nn.Module) -> nn.Module:
    """A frozen copy of ``encoder`` (MoCo: θ_k ← θ_q at init, ``requires_grad=False``)."""
    k = copy.deepcopy(encoder)
    for p in k.parameters():
        p.requires_grad_(False)
    return k


@torch.no_grad()
def momentum_update_(target: nn.Module, source: nn.Module, m: float) -> None:
    """θ_t ← m·θ_t + (1−m)·θ_s over **parameters only** (BN running stats are not averaged;
    moco_m_lorac.md §1.1), fused with ``torch._foreach_*``."""
    tp = [p.data for p in target.parameters()]
    sp = [p.data for p in source.parameters()]
    torch._foreach_mul_(tp, m)
    torch._foreach_add_(tp, sp, alpha=1.0 - m)


def default_shuffle_groups(per_process_batch: int) -> int:
    """Single-process emulation of shuffle-BN: as many groups as 32-image BN batches fit
    (the official 8 GPU × 32 setting), at most 8, at least 1. Ignored under DDP."""
    return max(1, min(8, per_process_batch // 32))


@torch.no_grad()
def shuffle_bn_forward(encoder: nn.Module, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Forward ``x`` through ``encoder`` with MoCo's shuffle-BN.

    Distributed: all-gather the batch, draw a permutation (every rank draws, so the RNG streams stay
    in step; rank 0's is broadcast), forward this rank's slice of the shuffled batch, gather the
    outputs and undo the shuffle. Single process: shuffle, forward ``groups`` chunks separately
    (separate BN statistics, as on ``groups`` GPUs), un-shuffle. ``groups == 1`` is a plain forward.
    """
    if D.is_dist():
        ws, rank = D.get_world_size(), D.get_rank()
        x_all = D.gather_no_grad(x)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        D.broadcast_(perm, 0)
        unshuffle = torch.argsort(perm)
        out = encoder(x_all[perm.view(ws, -1)[rank]])
        out_all = D.gather_no_grad(out)
        return out_all[unshuffle.view(ws, -1)[rank]]
    if groups <= 1:
        return encoder(x)
    if x.shape[0] % groups:
        raise ValueError(f"batch {x.shape[0]} is not divisible into {groups} shuffle-BN groups")
    perm = torch.randperm(x.shape[0], device=x.device)
    out = torch.cat([encoder(c) for c in x[perm].chunk(groups)])
    return out[torch.argsort(perm)]
