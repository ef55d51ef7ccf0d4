"""One optimisation step, shared by every training loop (pretraining, warm-up phases such as
CaCo's ``--ad_init``, the linear probe, fine-tuning).

lr → forward under autocast → scaled backward → unscale (LARC/LARS need the true gradients) →
``before_step`` hook → ``optimizer.step`` (skipped by GradScaler on an fp16 overflow) → scaler
update → :class:`StepInfo` with ``applied``.

With ``skip_nonfinite`` the loss is checked on every step (one all-reduce of a flag, so every
process skips the same steps): a non-finite loss on any process skips ``optimizer.step`` and the
scaler update, like GradScaler's own skip, and the step reports ``applied=False, nonfinite=True``.
State a method updates inside its forward (a MoCo queue) is not rolled back.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist

from ..optim import set_lr
from .hooks import StepInfo

log = logging.getLogger("ssl")


def amp_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """fp16 / bf16 autocast on CUDA; None (fp32) otherwise."""
    if device.type != "cuda" or not amp:
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]


class TrainStep:
    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, amp: str | None = None,
                 before_step: Callable[[StepInfo], None] | None = None, force_scaler: bool = False,
                 skip_nonfinite: bool = False):
        self.optimizer, self.device, self.before_step = optimizer, device, before_step
        self.skip_nonfinite = skip_nonfinite
        self.dtype = amp_dtype(amp, device)
        if amp and self.dtype is None:  # the entry scripts say so once, in words (src/sanity.py:amp_notice)
            log.debug("%s autocast is CUDA-only: this run trains in fp32", amp)
        # force_scaler: loss scaling without autocast (tests of the skipped-step path on the CPU)
        enabled = self.dtype is torch.float16 or force_scaler
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def __call__(self, loss_fn: Callable[[], dict], lr: float, epoch: int, iteration: int,
                 global_step: int) -> tuple[dict, StepInfo]:
        set_lr(self.optimizer, lr)
        with self.autocast():
            out = loss_fn()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        info = StepInfo(epoch, iteration, global_step, lr, applied=None)
        if self.skip_nonfinite and not self._finite_everywhere(out["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            info.applied, info.nonfinite = False, True
            return {k: v.detach() for k, v in out.items()}, info
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.before_step is not None:
            self.before_step(info)
        if self.scaler.is_enabled():
            # GradScaler.step already syncs on its inf check; reading the scale adds nothing
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            info.applied = self.scaler.get_scale() >= before  # the scale backs off exactly on a skipped step
        else:
            self.optimizer.step()
            info.applied = True
        return {k: v.detach() for k, v in out.items()}, info

    @staticmethod
    def _finite_everywhere(loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())
