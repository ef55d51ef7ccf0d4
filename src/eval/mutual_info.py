"""DisCo's "BI analysis" (swav.md §8): binned mutual information of a classifier's pre-softmax outputs.

For the first ``n`` samples with pre-softmax outputs T (n×C) and labels Y:

1. P = softmax(T) row-wise; every entry is put into one of ``bins`` (30) equal intervals of [0, 1],
   right-closed as ``pandas.cut``: (0, 1/30] → 0, (1/30, 2/30] → 1, …, ((b−1)/b, 1] → b−1;
2. samples whose binned vectors are equal form one state t;
3. I(X;T) = H(T) = −Σ_t p(t) log₂ p(t)  (the map X → T is deterministic, so H(T|X) = 0);
4. I(T;Y) = Σ_{t,y} p(t,y) log₂ [p(t,y) / (p(t) p(y))], with empirical frequencies over the n samples.

Both are in bits; 0 ≤ I(T;Y) ≤ min(I(X;T), log₂ #classes) and I(X;T) ≤ log₂ n. The official
``mi_by_binning.py`` hard-codes 10 labels; here the classes are those present in the labels (any
number). A probability of exactly 0 (softmax underflow) goes to the first bin; the official
``pandas.cut`` makes it NaN, which never compares equal, so each such sample became a state of its own.

:class:`MiTracker` is the hook of ``eval_linear.py --mi_every N``: every N training iterations it
runs backbone + head (eval mode) over a fixed set of ``--mi_samples`` training images and writes
``{"mi_iter", "epoch", "I_XT", "I_TY", "mi_samples"}`` to the run's ``log.jsonl``.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import UserError
from ..logger import RunLogger
from .features import extract_features

log = logging.getLogger("ssl")


def binned_states(logits: np.ndarray, bins: int = 30) -> np.ndarray:
    """Row-wise softmax of ``logits`` (n×C), each probability replaced by its bin index in [0, bins)."""
    t = np.asarray(logits, dtype=np.float64)
    p = np.exp(t - t.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    edges = np.arange(bins + 1) / float(bins)
    return np.clip(np.searchsorted(edges, p, side="left") - 1, 0, bins - 1)


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # never -0.0


def binned_mutual_information(logits, labels, n: int | None = None, bins: int = 30) -> tuple[float, float]:
    """(I(X;T), I(T;Y)) in bits over the first ``n`` rows (all when None); module docstring."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits must be n×C and labels n (got {logits.shape} and {labels.shape})")
    n = len(labels) if n is None else min(int(n), len(labels))
    if n < 1:
        raise ValueError("no samples for the mutual-information estimate")
    _, state = np.unique(binned_states(logits[:n], bins), axis=0, return_inverse=True)
    state = state.reshape(-1)
    _, y = np.unique(labels[:n], return_inverse=True)
    joint = np.zeros((int(state.max()) + 1, int(y.max()) + 1))
    np.add.at(joint, (state, y.reshape(-1)), 1.0)
    joint /= n
    pt, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    i_ty = float((joint[nz] * np.log2(joint[nz] / (pt @ py)[nz])).sum())
    return entropy_bits(np.bincount(state)), max(i_ty, 0.0)


class _Positional(Dataset):
    """``dataset`` restricted to ``indices``, items renumbered 0..n−1 (what :func:`extract_features` expects)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        x, y, _ = self.dataset[self.indices[int(item)]]
        return x, y, int(item)


class MiTracker:
    """I(X;T), I(T;Y) of backbone + head every ``every`` training iterations (global count,
    including the first), over ``samples`` training images drawn once with ``seed`` and read with
    ``eval_transform`` (so successive points differ by the classifier only). Collective: every
    rank calls :meth:`after_step` at the same iterations; rank 0 writes the log row."""

    def __init__(self, train_set: Dataset, eval_transform, backbone: nn.Module, head: nn.Module, logger: RunLogger,
                 every: int, samples: int, iters_per_epoch: int, batch_size: int, workers: int,
                 device: torch.device, seed: int = 0, bins: int = 30):
        if every < 1 or samples < 1 or bins < 1:
            raise UserError("--mi_every, --mi_samples and --mi_bins must be positive")
        view = copy.copy(train_set)
        view.transform = eval_transform
        n = min(samples, len(train_set))
        if n < samples:
            log.warning("--mi_samples %d: the training set has only %d images, using all of them", samples, n)
        g = torch.Generator().manual_seed(seed)
        self.data = _Positional(view, sorted(torch.randperm(len(train_set), generator=g)[:n].tolist()))
        self.backbone, self.head, self.logger = backbone, head, logger
        self.every, self.iters_per_epoch, self.bins = every, iters_per_epoch, bins
        self.batch_size, self.workers, self.device = batch_size, workers, device

    def after_step(self, epoch: int, it: int) -> None:
        g = epoch * self.iters_per_epoch + it
        if g % self.every == 0:
            self.measure(epoch, g)

    def measure(self, epoch: int, global_iter: int) -> tuple[float, float]:
        head = self.head.module if hasattr(self.head, "module") else self.head
        was_training = head.training
        net = nn.Sequential(self.backbone, head).eval()  # extract_features restores eval: the backbone stays frozen
        try:
            t, y = extract_features(net, self.data, self.batch_size, self.workers, self.device, normalize=False)
        finally:
            head.train(was_training)
        i_xt, i_ty = binned_mutual_information(t.cpu().numpy(), y.cpu().numpy(), bins=self.bins)
        log.info("iteration %d: I(X;T) %.4f bits, I(T;Y) %.4f bits over %d images", global_iter, i_xt, i_ty,
                 len(self.data))
        self.logger.write({"mi_iter": global_iter, "epoch": epoch, "I_XT": i_xt, "I_TY": i_ty,
                           "mi_samples": len(self.data)}, step=global_iter, prefix="mi/")
        return i_xt, i_ty
