"""MoCo v1/v2 (moco_m_lorac.md §7; DisCo's ``--hidden``, disco_pcl_evals.md A2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed as D
from ..models.backbones import build_encoder, feat_dim
from ..models.heads import moco_head
from ..models.momentum import make_momentum_copy, momentum_update_, shuffle_bn_forward
from ..models.queue import advance_, enqueue_, init_queue
from .base import ContrastiveMethod, topk_accuracy


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """[q·k⁺, qᵀQ] / T, shape N×(1+K); the positive is column 0."""
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    return torch.cat([l_pos, l_neg], dim=1) / T


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE with a queue of negatives: mean CE of :func:`moco_logits` with target 0."""
    logits = moco_logits(q, k, queue, T)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target), logits


class MoCo(ContrastiveMethod):
    """Query encoder, EMA key encoder (updated before the key forward), shuffle-BN, queue of K
    negatives (buffers ``queue`` (dim×K) and ``queue_ptr``), InfoNCE at temperature T."""

    def __init__(self, arch: str, dim: int = 128, K: int = 65536, m: float = 0.999, T: float = 0.07,
                 mlp: bool = False, hidden: int | None = -1, cifar_stem: bool = False, shuffle_groups: int = 1,
                 zero_init_residual: bool = False):
        super().__init__()
        self.arch, self.K, self.m, self.T, self.shuffle_groups = arch, K, m, T, shuffle_groups
        hidden = -1 if hidden is None else hidden
        # zero_init_residual: DisCo's moco/ baselines build ResNets with its vendored timm, whose
        # ResNet zero-inits the last BN of every residual block (docs/disco.md, "Initialisation")
        self.encoder_q = build_encoder(arch, moco_head(feat_dim(arch), dim, mlp, hidden), cifar_stem=cifar_stem,
                                       zero_init_residual=zero_init_residual)
        self.encoder_k = make_momentum_copy(self.encoder_q)
        self.register_buffer("queue", init_queue(dim, K))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = D.gather_no_grad(keys)
        enqueue_(self.queue, keys, self.queue_ptr)
        advance_(self.queue_ptr, keys.shape[0], self.K)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        im_q, im_k = crops[0], crops[1]
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            momentum_update_(self.encoder_k, self.encoder_q, self.m)
            k = F.normalize(shuffle_bn_forward(self.encoder_k, im_k, self.shuffle_groups), dim=1)
        loss, logits = moco_loss(q.float(), k.float(), self.queue.clone().detach(), self.T)
        self._dequeue_and_enqueue(k)
        acc1, acc5 = topk_accuracy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))
        return {"loss": loss, "acc1": acc1, "acc5": acc5}
