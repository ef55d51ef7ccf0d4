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
    """Raised inside a long phase (warm-up steps, kNN monitor, E-step) when a stop signal was received.
    ``state``: set by :meth:`FitContext.stop_point` inside ``on_fresh_start``, what the warm-up needs to
    continue; the engine saves it in the checkpoint under ``warmup``."""

    def __init__(self, state: dict | None = None):
        super().__init__()
        self.state = state


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
        """The run continues from a checkpoint (no fresh-start phase, unless the checkpoint was written
        inside it: :attr:`warmup_state`)."""
        return self._t.resumed_from is not None

    @property
    def warmup_state(self) -> dict | None:
        """In ``on_fresh_start`` of a run resumed from a checkpoint written inside it: the ``state`` given
        to the :meth:`stop_point` that stopped, with ``"iter"`` (warm-up iterations done, counted in this
        run's batches); None otherwise."""
        return self._t.warmup_state

    @property
    def resumed_mid_epoch(self) -> bool:
        """True during the first epoch of a run resumed in its middle: per-epoch state restored
        from the checkpoint (PCL's clustering) must not be recomputed."""
        return self._t.start_iter > 0 and self.epoch == self._t.start_epoch

    @property
    def epoch_len(self) -> int:
        return self._t.epoch_len

    def batches(self, epoch: int = 0,
                start: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """``(crops on device, target, index)`` of the training loader for ``epoch``, in the
        engine's seeded order, with the device-side batch transform applied, from batch ``start``
        (``warmup_state["iter"]`` after a resume: the first batch the stopped run had not seen)."""
        return self._t.iterate_batches(epoch, start)

    def forward(self, crops: list[torch.Tensor], index: torch.Tensor, **kw) -> dict:
        """The (DDP-wrapped) method forward: gradients are synchronised like a training step's."""
        return self._t.model(crops, index, **kw)

    def step(self, loss_fn: Callable[[], dict], lr: float, iteration: int) -> tuple[dict, StepInfo]:
        """The engine's own optimisation step (lr, autocast, scaled backward, unscale,
        ``before_optimizer_step``, optimizer step, scaler update). It does not poll the stop signal:
        the method calls :meth:`stop_point` once its own state is complete for the iteration."""
        return self._t.step(loss_fn, lr, self.epoch, iteration, iteration)

    def stop_point(self, next_iter: int, state: dict) -> None:
        """A point of the warm-up (``on_fresh_start``) where the method's state is complete after
        ``next_iter`` iterations. Collective: polls the stop signal every ``--stop_check_every``
        iterations, like the training loop; on a stop raises :class:`StopRequested` carrying
        ``{**state, "iter": next_iter}`` (plain values). The engine checkpoints the run with it, and the
        resumed run calls ``on_fresh_start`` again with :attr:`warmup_state` set to it."""
        if self._t.stop.due(next_iter - 1) and self._t.stop.poll():
            raise StopRequested({**state, "iter": next_iter})

    def log(self, metrics: dict[str, float], prefix: str = "warmup/") -> None:
        self._t.logger.write(metrics, step=int(metrics.get("iter", 0)), prefix=prefix)

    def should_stop(self) -> bool:
        """Collective: call on every rank at the same point."""
        return self._t.stop.poll()

    def stop_received(self) -> bool:
        """Local (not collective): whether this process has received a stop signal. For a phase that
        runs on one rank only (PCL's k-means on rank 0), whose result the ranks then agree on."""
        return self._t.stop.received is not None
