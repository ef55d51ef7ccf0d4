"""Reference recomputations for the end-to-end tests: an accuracy a script reports is recomputed here
with plain loops from its saved weights, so a wrong count, a wrong split or a wrong head is caught."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from src.data.datasets import ImageDataset
from src.data.transforms import IMAGENET_STD, eval_transform


@torch.no_grad()
def features(net: torch.nn.Module, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of every item of ``dataset``, one image at a time, in eval mode."""
    net.eval()
    xs, ys = [], []
    for i in range(len(dataset)):
        x, y, _ = dataset[i]
        xs.append(net(x.unsqueeze(0))[0].double().numpy())
        ys.append(int(y))
    return np.stack(xs), np.array(ys)


def image_split(root: str, split: str, image_size: int = 32, std=IMAGENET_STD) -> ImageDataset:
    return ImageDataset(os.path.join(root, split), eval_transform(image_size, std))


def linear_top1(backbone: torch.nn.Module, head_state: dict, dataset) -> float:
    """Top-1 (%) of ``Linear`` head weights (``linear.weight``/``linear.bias``) on the frozen backbone."""
    f, y = features(backbone, dataset)
    w, b = head_state["linear.weight"].double().numpy(), head_state["linear.bias"].double().numpy()
    pred = np.argmax(f @ w.T + b, axis=1)
    return 100.0 * float(np.mean(pred == y))


def knn_top1(backbone: torch.nn.Module, bank_set, query_set, k: int, t: float) -> float:
    """Weighted kNN written from its definition: each of the k most cosine-similar bank images votes
    exp(s/t) for its class; a query is right when its class gets the largest vote."""
    fb, yb = features(backbone, bank_set)
    fq, yq = features(backbone, query_set)
    fb /= np.linalg.norm(fb, axis=1, keepdims=True)
    fq /= np.linalg.norm(fq, axis=1, keepdims=True)
    right = 0
    for q, label in zip(fq, yq):
        s = fb @ q
        votes: dict[int, float] = {}
        for j in np.argsort(-s, kind="stable")[:k]:
            votes[int(yb[j])] = votes.get(int(yb[j]), 0.0) + math.exp(s[j] / t)
        right += max(votes, key=votes.get) == label
    return 100.0 * right / len(fq)
