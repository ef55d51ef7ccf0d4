"""SogCLR: global contrastive loss with a per-sample moving-average estimator ``u``
(sogclr_caco.md Part A), and the plain SimCLR NT-Xent (``--loss_type cl``).

Notation: B local batch, B_g = B·P global batch, τ temperature, n = 2(B_g − 1) negatives per anchor.

- :func:`dcl_loss` is A1 step by step (pure, no state): un-scaled cosine logits, self masked with
  −1e9, positive excluded from the negative sum, fresh estimate ĝ = Σ exp(s/τ)/n, u = (1−γ)u_old + γĝ,
  weights w = stopgrad(exp(s/τ)/u), surrogate ℓ = −(s_pos − Σ w·s / n), loss = mean(ℓ₁ + ℓ₂).
- :func:`nt_xent` is [S-cifar] ``contrastive_loss``: logits / τ, CE with the positive in the
  denominator over the 2B_g − 1 other gathered embeddings, loss = mean(ℓ₁ + ℓ₂).
- :func:`scatter_last_` writes the gathered u update: one value per dataset index, and when an index
  occurs more than once in the gathered batch (sampler padding, ranks sharing an index) the **last
  occurrence in gather order wins** (deterministic on every device; the official CPU ``index_put``
  behaves the same way in practice).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..models.backbones import build_encoder, feat_dim
from ..models.heads import bn_mlp
from .base import ContrastiveMethod, Headless

LARGE_NUM = 1e9


def _logit_blocks(h1: torch.Tensor, h2: torch.Tensor, H1: torch.Tensor, H2: torch.Tensor, offset: int,
                  scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row logits ``[ab | aa]`` and ``[ba | bb]`` (B×2B_g) with self masked by −LARGE_NUM, and the
    column of the positive (``offset + arange(B)``, in the ab / ba block)."""
    B, Bg = h1.shape[0], H1.shape[0]
    pos = torch.arange(B, device=h1.device) + offset
    self_mask = F.one_hot(pos, Bg).to(h1.dtype) * LARGE_NUM
    aa = h1 @ H1.T * scale - self_mask
    bb = h2 @ H2.T * scale - self_mask
    ab = h1 @ H2.T * scale
    ba = h2 @ H1.T * scale
    return torch.cat([ab, aa], 1), torch.cat([ba, bb], 1), pos


def dcl_loss(h1: torch.Tensor, h2: torch.Tensor, H1: torch.Tensor, H2: torch.Tensor, u_old: torch.Tensor,
             gamma: float | torch.Tensor, T: float, offset: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SogCLR dynamic contrastive loss (A1). ``h1, h2``: local normalised embeddings (B×d);
    ``H1, H2``: their gathers over all ranks (B_g×d, local rows at ``offset``); ``u_old``: u at the
    local indices (B); ``gamma``: weight of the new estimate (1 on a first visit, A1.7).
    Returns ``(loss, u1, u2)``; u1/u2 (B, detached) are the per-direction moving averages."""
    Bg = H1.shape[0]
    n = 2 * (Bg - 1)
    l1, l2, pos = _logit_blocks(h1, h2, H1, H2, offset)
    labels = F.one_hot(pos, 2 * Bg).to(l1.dtype)
    neg_mask = 1.0 - labels
    e1 = torch.exp(l1 / T) * neg_mask
    e2 = torch.exp(l2 / T) * neg_mask
    u1 = (1 - gamma) * u_old + gamma * e1.sum(1) / n
    u2 = (1 - gamma) * u_old + gamma * e2.sum(1) / n
    w1 = (e1 / u1.unsqueeze(1)).detach()
    w2 = (e2 / u2.unsqueeze(1)).detach()
    loss1 = -(labels * l1).sum(1) + (w1 * l1).sum(1) / n
    loss2 = -(labels * l2).sum(1) + (w2 * l2).sum(1) / n
    return (loss1 + loss2).mean(), u1.detach(), u2.detach()


def nt_xent(h1: torch.Tensor, h2: torch.Tensor, H1: torch.Tensor, H2: torch.Tensor, T: float,
            offset: int = 0) -> torch.Tensor:
    """SimCLR NT-Xent ([S-cifar] ``contrastive_loss``, A1 ``loss_type``): logits s/τ, the positive in
    the denominator, the 2B_g − 1 other gathered embeddings as the rest; mean over the local batch
    of the two directions' cross-entropies summed."""
    l1, l2, pos = _logit_blocks(h1, h2, H1, H2, offset, scale=1.0 / T)
    return (F.cross_entropy(l1, pos, reduction="none") + F.cross_entropy(l2, pos, reduction="none")).mean()


@torch.no_grad()
def scatter_last_(u: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``u[index[k]] = values[k]`` for every k, the last k winning for repeated indices."""
    uniq, inv = torch.unique(index, return_inverse=True)
    order = torch.arange(index.numel(), device=index.device)
    last = torch.full((uniq.numel(),), -1, dtype=torch.long, device=index.device)
    last.scatter_reduce_(0, inv, order, reduce="amax", include_self=True)
    u[uniq] = values[last].to(u.dtype)
    return u


def sogclr_encoder(arch: str, dim: int = 128, mlp_dim: int = 2048, num_proj_layers: int = 2,
                   cifar_stem: bool = False) -> nn.Module:
    """torchvision ResNet (zero-init residual) whose ``fc`` is the SogCLR projector (A2):
    Linear(F→mlp, no bias) → BN → ReLU → Linear(mlp→dim, no bias) → BN(affine=False)."""
    head = bn_mlp(feat_dim(arch), mlp_dim, dim, num_layers=num_proj_layers, last_bn=True,
                  last_bn_affine=False, bias=False)
    return build_encoder(arch, head, cifar_stem=cifar_stem, zero_init_residual=True)


class SogCLR(ContrastiveMethod):
    """One shared encoder ``base_encoder`` (official key names ``module.base_encoder.*``, projector
    under ``base_encoder.fc``) and the buffer ``u`` (length ``num_samples`` = len(dataset), on the
    training device, one scalar per image). Every rank applies the same gathered u update, so the
    replicas stay identical without any broadcast.

    ``full_grad``: differentiable gather with the all-reduced backward (exact gradient of the global
    loss). False (default) is the official ``all_gather_layer``: local slice only (A5).
    ``u_update``: ``mean`` writes (u₁+u₂)/2 (official HEAD); ``sum`` writes u₁+u₂ (before e944141)."""

    def __init__(self, arch: str, num_samples: int, dim: int = 128, mlp_dim: int = 2048, T: float = 0.1,
                 gamma: float = 0.9, loss_type: str = "dcl", full_grad: bool = False, num_proj_layers: int = 2,
                 u_update: str = "mean", cifar_stem: bool = False, base_encoder: nn.Module | None = None):
        super().__init__()
        if loss_type not in ("dcl", "cl"):
            raise ValueError(f"loss_type must be 'dcl' or 'cl', not {loss_type!r}")
        if u_update not in ("mean", "sum"):
            raise ValueError(f"u_update must be 'mean' or 'sum', not {u_update!r}")
        self.arch, self.T, self.gamma, self.loss_type = arch, T, gamma, loss_type
        self.full_grad, self.u_update = full_grad, u_update
        self.base_encoder = base_encoder if base_encoder is not None else \
            sogclr_encoder(arch, dim, mlp_dim, num_proj_layers, cifar_stem)
        self.register_buffer("u", torch.zeros(num_samples))

    # ------------------------------------------------------------------ engine hooks
    def backbone(self) -> nn.Module:
        return Headless(self.base_encoder, self.arch)

    def state_dict_from_checkpoint(self, state_dict: dict[str, Any], ckpt: dict[str, Any]) -> dict[str, Any]:
        """An official checkpoint keeps ``u`` (N×1, N hard-coded: 1281167+1 for ImageNet-1k, 129395+1
        for ImageNet-100) outside ``state_dict``: its first ``len(dataset)`` entries are this run's u
        (the dataset index is the position in the sorted sample list in both codes)."""
        if "u" in state_dict or "u" not in ckpt:
            return state_dict
        u = ckpt["u"].reshape(-1)
        n = self.u.numel()
        if u.numel() < n:
            raise RuntimeError(f"the checkpoint's u has {u.numel()} entries, fewer than the {n} training images")
        return {**state_dict, "u": u[:n].to(self.u.dtype)}

    def extra_checkpoint_items(self) -> dict[str, Any]:
        """The official top-level ``u``: an N×1 CPU float tensor (A6)."""
        return {"u": self.u.detach().to("cpu", torch.float32).reshape(-1, 1).clone()}

    # ------------------------------------------------------------------ training step
    def forward(self, crops: list[torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        z1 = self.base_encoder(crops[0])
        z2 = self.base_encoder(crops[1])
        with torch.autocast(z1.device.type, enabled=False):  # the loss in fp32 (A10.5)
            return self.loss(z1.float(), z2.float(), index)

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalise, gather (A5), loss; for ``dcl`` also update ``u`` in place on every rank."""
        h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        H1 = D.gather_with_grad(h1, full_grad=self.full_grad)
        H2 = D.gather_with_grad(h2, full_grad=self.full_grad)
        if H1.shape[0] < 2:
            raise ValueError("SogCLR needs a global batch of at least 2")
        offset = D.get_rank() * h1.shape[0]
        if self.loss_type == "cl":
            return {"loss": nt_xent(h1, h2, H1, H2, self.T, offset)}
        idx = index.to(self.u.device, torch.long)
        u_old = self.u[idx]
        # first-visit rule (A1.7): γ = 1 when u is 0 at every local index (no host sync)
        gamma = torch.where(u_old.sum() == 0, torch.ones((), device=u_old.device),
                            torch.full((), float(self.gamma), device=u_old.device))
        loss, u1, u2 = dcl_loss(h1, h2, H1, H2, u_old, gamma, self.T, offset)
        new = u1 + u2 if self.u_update == "sum" else (u1 + u2) / 2
        scatter_last_(self.u, D.gather_no_grad(idx), D.gather_no_grad(new))
        return {"loss": loss, "u_mean": new.mean()}
