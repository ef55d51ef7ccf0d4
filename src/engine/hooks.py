"""What the engine tells a method: :class:`StepInfo` every step, :class:`FitContext` around epochs.

A method never receives the trainer itself; these two typed views are its whole window on the loop
(the hooks are listed on :class:`src.methods.base.ContrastiveMethod`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .. import distributed as D
    from .loop import Trainer


@dataclass
class StepInfo:
    """One optimisation step. ``applied`` is False when GradScaler skipped ``optimizer.step`` (an
    fp16 overflow, or a non-finite loss under ``--skip_nonfinite``, then ``nonfinite`` is True): state
    updates tied to the step (CaCo's memory) must then be skipped too. It is None in
    ``before_optimizer_step``, where the outcome is not known yet."""
    epoch: int
    iteration: int
    global_step: int
    lr: float
    applied: bool | None = True
    nonfinite: bool = False


class StopRequested(Exception):
    """Raised inside a long phase (warm-up steps, kNN monitor) when a stop signal was received."""


class FitContext:
    """The loop as a method sees it in ``on_fresh_start`` / ``on_epoch_start``."""

    def __init__(self, trainer: "Trainer"):
        self._t = trainer
        self.epoch = trainer.start_epoch

    @property
    def device(self) -> torch.device:
        return self._t.device

    @property
    def info(self) -> "D.DistInfo":
        return self._t.info

    @property
    def resumed(self) -> bool:
        """The run continues from a checkpoint (no fresh-start phase)."""
        return self._t.resumed_from is not None

    @property
    def resumed_mid_epoch(self) -> bool:
        """True during the first epoch of a run resumed in its middle: per-epoch state restored
        from the checkpoint (PCL's clustering) must not be recomputed."""
        return self._t.start_iter > 0 and self.epoch == self._t.start_epoch

    @property
    def epoch_len(self) -> int:
        return self._t.epoch_len

    def batches(self, epoch: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """``(crops on device, target, index)`` of the training loader for ``epoch``, in the
        engine's seeded order, with the device-side batch transform applied."""
        return self._t.iterate_batches(epoch)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor, **kw) -> dict:
        """The (DDP-wrapped) method forward: gradients are synchronised like a training step's."""
        return self._t.model(crops, index, **kw)

    def step(self, loss_fn: Callable[[], dict], lr: float, iteration: int) -> tuple[dict, StepInfo]:
        """The engine's own optimisation step (lr, autocast, scaled backward, unscale,
        ``before_optimizer_step``, optimizer step, scaler update). Polls the stop signal like the
        training loop and raises :class:`StopRequested` when one arrived."""
        out, info = self._t.step(loss_fn, lr, self.epoch, iteration, iteration)
        if self._t.stop.due(iteration) and self._t.stop.poll():
            raise StopRequested()
        return out, info

    def log(self, metrics: dict[str, float], prefix: str = "warmup/") -> None:
        self._t.logger.write(metrics, step=int(metrics.get("iter", 0)), prefix=prefix)

    def should_stop(self) -> bool:
        """Collective: call on every rank at the same point."""
        return self._t.stop.poll()
