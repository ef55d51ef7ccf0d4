"""What every method module provides to the engine.

A method is an ``nn.Module`` that owns all of its state as parameters or buffers (queue, SogCLR
``u``, CaCo memory, PCL clustering), so that ``state_dict()`` is a complete resume. The engine
calls, per iteration, ``forward(crops, index) -> dict`` (``loss`` plus scalar metrics), and the hooks
below (docs/architecture.md); nothing method-specific lives in the loop.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..models.backbones import head_attr

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.hooks import FitContext, StepInfo


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
    """The engine's hooks, all no-ops by default. Subclasses set ``self.arch`` and ``self.encoder_q``.

    Order within a run: ``on_fresh_start`` (only when the run did not resume, or stopped inside it) → per epoch
    ``on_epoch_start`` → per step ``forward`` → backward → ``before_optimizer_step`` →
    ``optimizer.step`` → ``after_step``."""

    arch: str
    encoder_q: nn.Module

    def on_fresh_start(self, ctx: "FitContext") -> None:
        """Before the first epoch of a run that did not resume (CaCo's ``--ad_init`` warm-up,
        through ``ctx.step`` so AMP, the lr and the logging are the engine's). Resumable: after each
        iteration the hook calls ``ctx.stop_point(next_iter, state)``; a stop there checkpoints the run
        and the resumed run calls the hook again with ``ctx.warmup_state`` (that ``state`` + ``iter``)."""

    def on_epoch_start(self, epoch: int, ctx: "FitContext | None" = None) -> None:
        """Before every epoch, also the first after a resume. When a run resumes in the middle of
        an epoch (``ctx.resumed_mid_epoch``), per-epoch state that lives in buffers (restored from
        the checkpoint) must not be recomputed. A long phase (PCL's E-step) polls
        ``ctx.should_stop()`` and raises :class:`~src.engine.hooks.StopRequested`: the engine then
        checkpoints the start of the epoch (method state unchanged) and the hook runs again on resume."""

    def before_optimizer_step(self, step: "StepInfo") -> None:
        """After backward (gradients unscaled), before ``optimizer.step`` (SwAV freezes its
        prototypes' gradients for the first iterations)."""

    def after_step(self, step: "StepInfo") -> None:
        """After the optimiser step. ``step.applied`` is False when GradScaler skipped it (fp16
        overflow): state updates tied to the step must be skipped then."""

    def frozen_modules(self) -> list[str]:
        """Attribute names of frozen submodules (a DisCo teacher): no gradient, never in the
        optimiser (build it from :meth:`trainable_parameters`), ignored by DDP, and left out of
        the training checkpoints unless the run asks to keep them."""
        return []

    def is_frozen_key(self, key: str) -> bool:
        return any(key == n or key.startswith(n + ".") for n in self.frozen_modules())

    def frozen_state_names(self) -> list[str]:
        """Fully qualified parameter and buffer names of the frozen modules (DDP's ignore list)."""
        names = [n for n, _ in self.named_parameters()] + [n for n, _ in self.named_buffers()]
        return [n for n in names if self.is_frozen_key(n)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that require a gradient, outside the frozen modules."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not self.is_frozen_key(n)]

    def backbone(self) -> nn.Module:
        """The network whose pooled features are evaluated (kNN monitor, export)."""
        return Headless(self.encoder_q, self.arch)

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
