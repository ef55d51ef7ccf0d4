"""The shared training engine, one concern per module:

- :mod:`.loop`: :class:`Trainer` (the loop) and :class:`EngineConfig`;
- :mod:`.step`: :class:`TrainStep`, one optimisation step (AMP, GradScaler, hooks), reused by
  warm-up phases and the evaluation loops;
- :mod:`.hooks`: :class:`StepInfo` and :class:`FitContext`, what a method sees of the loop;
- :mod:`.resume`: :class:`CheckpointPolicy`, checkpoint contents, the rank-0 resume decision;
- :mod:`.preemption`: :class:`StopSignal` (SIGTERM / SIGUSR1);
- :mod:`.monitor`: :class:`KnnMonitor`;
- :mod:`.rng`: seeding and RNG snapshots.
See docs/architecture.md.
"""
from .hooks import FitContext, StepInfo, StopRequested
from .loop import EngineConfig, NonFiniteLoss, Trainer
from .monitor import KnnMonitor
from .preemption import StopSignal
from .resume import CheckpointPolicy
from .rng import rng_state, seed_everything, set_rng_state
from .step import TrainStep

__all__ = ["CheckpointPolicy", "EngineConfig", "FitContext", "KnnMonitor", "NonFiniteLoss", "StepInfo",
           "StopRequested", "StopSignal", "Trainer", "TrainStep", "rng_state", "seed_everything", "set_rng_state"]
