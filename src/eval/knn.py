"""Weighted k-nearest-neighbour classification on L2-normalised features.

Each of the k nearest bank features (cosine similarity s) votes for its class with weight
exp(s / T); the class with the largest summed vote wins (CaCo's ``knn_monitor``, InstDisc's
weighted kNN; defaults k = 20, T = 0.2 as CaCo, sogclr_caco.md B5).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, T: float = 0.2, chunk: int = 1024) -> torch.Tensor:
    """Class scores (Nq × C) of the weighted kNN vote. Features must be L2-normalised."""
    k = min(k, bank.shape[0])
    out = []
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s:s + chunk] @ bank.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels[idx], (w / T).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=bank.device)


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 20, T: float = 0.2) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of :func:`knn_predict`."""
    if queries.shape[0] == 0:
        return 0.0, 0.0
    scores = knn_predict(bank, bank_labels, queries, num_classes, k, T)
    top = scores.topk(min(5, num_classes), dim=1).indices
    correct = top.eq(query_labels.view(-1, 1))
    return correct[:, 0].float().mean().item() * 100, correct.any(1).float().mean().item() * 100
