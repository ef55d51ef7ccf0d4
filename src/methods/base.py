"""What every method module provides to the engine.

A method is an ``nn.Module`` that owns all of its state as parameters or buffers (queue, SogCLR
``u``, CaCo memory, PCL clustering), so that ``state_dict()`` is a complete resume. The engine
calls, per iteration, ``forward(crops, index) -> dict`` (``loss`` plus scalar metrics), and the hooks
below; nothing method-specific lives in the loop.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..models.backbones import head_attr


class Headless(nn.Module):
    """Run ``encoder`` with its projection head bypassed: returns the pooled backbone feature.
    The encoder is not registered as a child (no duplicate state-dict entries)."""

    def __init__(self, encoder: nn.Module, arch: str):
        super().__init__()
        object.__setattr__(self, "encoder", encoder)
        self.attr = head_attr(arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = getattr(self.encoder, self.attr)
        setattr(self.encoder, self.attr, nn.Identity())
        try:
            return self.encoder(x)
        finally:
            setattr(self.encoder, self.attr, head)

    def train(self, mode: bool = True):
        self.encoder.train(mode)
        return self


class ContrastiveMethod(nn.Module):
    """Default (no-op) hooks. Subclasses set ``self.arch`` and ``self.encoder_q``."""

    arch: str
    encoder_q: nn.Module

    def on_epoch_start(self, epoch: int, engine: Any = None) -> None:
        """Called before every epoch, also the first after a resume. When a run resumes in the
        middle of an epoch (``engine.resumed_mid_epoch``), per-epoch state that lives in buffers
        (restored from the checkpoint) must not be recomputed."""

    def after_step(self) -> None:
        """Called after each optimiser step (CaCo's memory update)."""

    def backbone(self) -> nn.Module:
        """The network whose pooled features are evaluated (kNN monitor, export)."""
        return Headless(self.encoder_q, self.arch)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.encoder_q]

    def extra_checkpoint_items(self) -> dict[str, Any]:
        """Extra top-level checkpoint keys of the official layout (e.g. SogCLR's ``u``)."""
        return {}

    def state_dict_from_checkpoint(self, state_dict: dict[str, Any], ckpt: dict[str, Any]) -> dict[str, Any]:
        """The state dict to resume from (``module.`` already stripped). Methods whose official
        checkpoints keep state outside ``state_dict`` (SogCLR's top-level ``u``) move it in here."""
        return state_dict


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Top-k accuracy in percent, as tensors (no host sync)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, 1, True, True).indices
    correct = pred.eq(target.view(-1, 1))
    return [correct[:, :min(k, maxk)].any(1).float().mean() * 100 for k in ks]
