"""Projection heads. Built as ``nn.Sequential`` so that state-dict names match the official code
(``fc.0`` / ``fc.2`` for MoCo's MLP; ``fc.0 fc.1 fc.3 fc.4`` for SogCLR's BN projector)."""
from __future__ import annotations

import torch.nn as nn


def moco_head(in_dim: int, out_dim: int = 128, mlp: bool = True, hidden: int = -1) -> nn.Module:
    """MoCo v1/v2 head with DisCo's ``--hidden`` (disco_pcl_evals.md A2):
    no ``--mlp``: Linear(F, out); with ``--mlp``: hidden -1 → Linear(F,F)-ReLU-Linear(F,out),
    0 → Sequential(Linear(F, out)) (key ``fc.0``, as DisCo's ``moco/moco/builder.py``),
    n → Linear(F,n)-ReLU-Linear(n,out). No BN. The Linear layers keep PyTorch's default init (the
    official builders replace the head after the network's own init)."""
    if not mlp:
        return nn.Linear(in_dim, out_dim)
    if hidden == 0:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    h = in_dim if hidden < 0 else hidden
    return nn.Sequential(nn.Linear(in_dim, h), nn.ReLU(inplace=True), nn.Linear(h, out_dim))


def bn_mlp(in_dim: int, hidden: int, out_dim: int, num_layers: int = 2, last_bn: bool = True,
           last_bn_affine: bool = False, bias: bool = False) -> nn.Sequential:
    """MoCo v3 style projector: (Linear → BN → ReLU) × (num_layers−1) → Linear [→ BN(affine?)].
    SogCLR: num_layers 2, last BN without affine (sogclr_caco.md A2). CaCo: 3 layers, no last BN (B2)."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden, bias=bias), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    layers.append(nn.Linear(d, out_dim, bias=bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)
