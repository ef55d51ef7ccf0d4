"""Weighted k-nearest-neighbour classification on L2-normalised features.

Each of the k nearest bank features (cosine similarity s) votes for its class with weight
exp(s / T); the class with the largest summed vote wins (CaCo's ``knn_monitor``, InstDisc's
weighted kNN; defaults k = 20, T = 0.2 as CaCo, sogclr_caco.md B5).

The bank may be **sharded over the processes** (each rank holds the features of its own images,
e.g. 1/8 of ImageNet's 1.28 M × 2048 on each of 8 GPUs instead of all of it on every GPU): every
rank finds the top-k of its shard for every query, the candidates are all-gathered and merged.
The result equals the single-process kNN over the whole bank.
"""
from __future__ import annotations

import torch

from .. import distributed as D


@torch.no_grad()
def _topk(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, sharded: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, labels) of the k nearest neighbours (Nq × k); with ``sharded``, over the
    bank shards of all ranks."""
    kk = min(k, bank.shape[0])
    sim = queries @ bank.T
    if kk > 0:
        w, idx = sim.topk(kk, dim=1)
        lab = bank_labels[idx]
    else:
        w = sim.new_zeros(queries.shape[0], 0)
        lab = bank_labels.new_zeros(queries.shape[0], 0)
    if not (sharded and D.is_dist()):
        return w, lab
    pad = k - kk  # shards smaller than k: pad with -inf (weight exp(-inf) = 0)
    w = torch.cat([w, w.new_full((w.shape[0], pad), float("-inf"))], 1)
    lab = torch.cat([lab, lab.new_zeros(lab.shape[0], pad)], 1)
    W, L = D.gather_no_grad(w.unsqueeze(0)), D.gather_no_grad(lab.unsqueeze(0))  # ranks × Nq × k
    W = W.permute(1, 0, 2).reshape(w.shape[0], -1)
    L = L.permute(1, 0, 2).reshape(w.shape[0], -1)
    n_total = int(D.all_reduce_sum_(torch.tensor([bank.shape[0]], device=bank.device)).item())
    w, sel = W.topk(min(k, n_total), dim=1)
    return w, L.gather(1, sel)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, T: float = 0.2, chunk: int = 1024, sharded: bool = False) -> torch.Tensor:
    """Class scores (Nq × C) of the weighted kNN vote. Features must be L2-normalised. With
    ``sharded`` (under a process group), ``bank`` is this rank's shard and ``queries`` are the same
    on every rank."""
    out = []
    for s in range(0, queries.shape[0], chunk):
        w, lab = _topk(bank, bank_labels, queries[s:s + chunk], k, sharded)
        votes = torch.zeros(w.shape[0], num_classes, device=w.device, dtype=w.dtype)
        votes.scatter_add_(1, lab, (w / T).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=bank.device)


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 20, T: float = 0.2, sharded: bool = False) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of :func:`knn_predict`."""
    if queries.shape[0] == 0:
        return 0.0, 0.0
    scores = knn_predict(bank, bank_labels, queries, num_classes, k, T, sharded=sharded)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top.eq(query_labels.view(-1, 1))
    return correct[:, 0].float().mean().item() * 100, correct.any(1).float().mean().item() * 100
