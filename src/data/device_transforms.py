"""Device-side batch transforms: the hook between the host→device copy and the forward.

A batch transform is a callable ``(crops: list[Tensor B×C×H×W], seeds: int64 Tensor B) -> list[Tensor]``.
``seeds`` are :func:`~src.data.datasets.augmentation_seed` (seed, epoch, image index) — the same
numbers the CPU path seeds each image's augmentation with — so a device transform is deterministic
per image, whatever the batch it lands in, the number of processes or a resume.

Per-image random numbers come from :func:`uniform`, a counter-based generator (SplitMix64 of
``seed``, view and draw number), which gives the same values on CPU and CUDA without per-image
generator objects. The device augmentation pipeline (:mod:`src.data.gpu_pipeline`) builds on them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

BatchTransform = Callable[[list, torch.Tensor], list]

_M1, _M2, _GOLD = -4658895280553007687, -7723592293110705685, -7046029254386353131  # SplitMix64 constants (int64)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLD
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def uniform(seeds: torch.Tensor, draws: int, stream: int = 0) -> torch.Tensor:
    """``B × draws`` floats in [0, 1): draw ``j`` of image ``b`` is a pure function of
    (seeds[b], stream, j). Use a distinct ``stream`` per view / per operation. The top 24 bits make
    the value, exact in float32, so it never rounds up to 1.0."""
    j = torch.arange(draws, device=seeds.device, dtype=torch.int64)
    x = splitmix64(seeds.long().view(-1, 1) * 1_000_003 + stream * 7_919 + j.view(1, -1))
    return _shr(x, 40).float().mul_(2.0 ** -24)


class DeviceFlip:
    """Horizontal flip with probability ``p`` per image and view."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, crops: list, seeds: torch.Tensor) -> list:
        out = []
        for v, x in enumerate(crops):
            flip = (uniform(seeds, 1, stream=100 + v)[:, 0] < self.p).to(x.device).view(-1, 1, 1, 1)
            out.append(torch.where(flip, x.flip(-1), x))
        return out


class DeviceNormalize:
    """Per-channel ``(x − mean) / std`` of float images (uint8 inputs are scaled to [0, 1] first)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, crops: list, seeds: torch.Tensor) -> list:
        out = []
        for x in crops:
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
            out.append((x - self.mean.to(x.device)) / self.std.to(x.device))
        return out


class DeviceCompose:
    def __init__(self, ops: Sequence[BatchTransform]):
        self.ops = list(ops)

    def __call__(self, crops: list, seeds: torch.Tensor) -> list:
        for op in self.ops:
            crops = op(crops, seeds)
        return crops
