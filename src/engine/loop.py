"""The one training loop all ``main_*.py`` share.

``fit()``: resume (decided by rank 0) → ``on_fresh_start`` (runs that did not resume, or resumed inside
it) → per epoch:
``on_epoch_start`` → iterations → kNN monitor → logs → checkpoint. Per iteration: batch to the
device (``data_on_device``: gathered from the resident dataset and augmented there instead,
:mod:`src.data.resident`) → optional device-side batch transform → :class:`TrainStep` (lr, autocast, scaled backward,
``before_optimizer_step``, step) → ``after_step(StepInfo)``. Stop signals are polled every
``stop_check_every`` steps, at every epoch end, inside the monitor, inside ``on_epoch_start``
(a hook raising :class:`StopRequested`) and at the warm-up's ``FitContext.stop_point``; a stop writes a
checkpoint that resumes exactly (a warm-up's under the key ``warmup``: its position and the method's state).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed as D
from ..checkpoint import save_atomic
from ..data import fast_path
from ..data.datasets import EpochSampler, augmentation_seed, collate_crops
from ..data.device_transforms import BatchTransform
from ..data.resident import resident_loader
from ..errors import UserError
from ..logger import RunLogger
from ..methods.base import ContrastiveMethod
from . import resume as R
from .hooks import FitContext, StopRequested
from .monitor import KnnMonitor
from .preemption import StopSignal, requeue_slurm_job
from .step import TrainStep

log = logging.getLogger("ssl")


class NonFiniteLoss(UserError):
    pass


@dataclass
class EngineConfig:
    epochs: int
    batch_size: int                # per process
    output_dir: str
    checkpoint: R.CheckpointPolicy
    method_name: str
    arch: str
    args: dict = field(default_factory=dict)
    workers: int = 4
    print_freq: int = 10
    amp: str | None = None         # None | "fp16" | "bf16" (CUDA only; fp32 on CPU)
    channels_last: bool = False
    resume: str | None = None
    auto_resume: bool = True
    seed: int = 0                  # data order and augmentation seed
    knn_freq: int = 0              # epochs between kNN monitor runs (0: never, unless the monitor has a schedule)
    find_unused_parameters: bool = False
    max_iters: int | None = None   # stop each epoch after this many iterations (smoke tests)
    start_epoch: int = 0           # first epoch when not resuming (a resumed checkpoint overrides it)
    stop_check_every: int = 10     # steps between two stop-signal polls
    skip_nonfinite: int = 0        # non-finite-loss steps skipped before the run stops (0: stop at the first)
    requeue: bool = False          # after a stop by signal under SLURM: `scontrol requeue $SLURM_JOB_ID`
    save_frozen: bool = False      # keep frozen modules (a DisCo teacher) in the checkpoints
    data_on_device: bool = False   # in-memory dataset resident on the device, augmented there (data/resident.py)
    fast_aug: str = "auto"         # auto|on|off: workers crop, the device does the rest (data/fast_path.py)


class Trainer:
    def __init__(self, method: ContrastiveMethod, optimizer: torch.optim.Optimizer,
                 lr_schedule: Callable[[int, int, int], float], train_set: Dataset, cfg: EngineConfig,
                 info: D.DistInfo, knn: KnnMonitor | None = None, batch_transform: BatchTransform | None = None):
        self.method, self.optimizer, self.lr_schedule, self.cfg, self.info, self.knn = \
            method, optimizer, lr_schedule, cfg, info, knn
        self.batch_transform = batch_transform
        self.device = info.device
        cuda = self.device.type == "cuda"
        self._freeze(method, optimizer)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        self.sampler = EpochSampler(len(train_set), info.world_size, info.rank, shuffle=True, seed=cfg.seed)
        if cfg.data_on_device:  # no workers: the uint8 dataset lives on the device, augmented there per batch
            self.loader = resident_loader(train_set, self.sampler, cfg.batch_size, self.device)
        else:
            if self.batch_transform is None:  # workers crop and flip; the colour ops run batched on the device
                self.batch_transform = fast_path.install(train_set, cfg.fast_aug, self.device)
            self.loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=self.sampler,
                                     num_workers=cfg.workers, pin_memory=cuda, drop_last=True,
                                     persistent_workers=cfg.workers > 0, collate_fn=collate_crops,
                                     generator=torch.Generator().manual_seed(cfg.seed))  # never draws from the global RNG
        if len(self.loader) == 0:
            raise UserError(f"the training set has {len(train_set)} images: fewer than one batch of "
                            f"{cfg.batch_size} per process x {info.world_size} processes; lower the batch size")
        self.train_set = train_set
        self.epoch_len = len(self.loader)  # iterations of a full epoch: what the lr schedules count
        self.iters = self.epoch_len if cfg.max_iters is None else min(cfg.max_iters, self.epoch_len)
        if info.distributed:
            frozen = method.frozen_state_names()
            if frozen:  # loaded identically on every rank; no broadcast, no gradient sync
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, frozen)
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                method, device_ids=[self.device.index] if cuda else None, forward_sync_buffers=False,
                find_unused_parameters=cfg.find_unused_parameters)
        else:
            self.model = method
        self.step = TrainStep(optimizer, self.device, cfg.amp, before_step=method.before_optimizer_step,
                              skip_nonfinite=cfg.skip_nonfinite > 0)
        self.nonfinite_skipped = 0   # steps skipped for a non-finite loss in this run (--skip_nonfinite)
        self.scaler = self.step.scaler
        self.stop = StopSignal(cfg.stop_check_every)
        self.logger = RunLogger(cfg.output_dir, active=info.is_main)
        self.start_epoch = cfg.start_epoch
        self.start_iter = 0          # > 0 when resuming in the middle of an epoch
        self.consumed = 0            # positions of the start epoch's permutation already read
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None
        self.warmup_state: dict | None = None   # resumed inside on_fresh_start: where it stopped (FitContext)
        self._warmup_consumed = 0    # images of the warm-up's epoch the stopped run had read (all ranks)

    @staticmethod
    def _freeze(method: ContrastiveMethod, optimizer: torch.optim.Optimizer) -> None:
        frozen = {id(p) for name in method.frozen_modules() for p in getattr(method, name).parameters()}
        for name in method.frozen_modules():
            getattr(method, name).requires_grad_(False)
        if any(id(p) in frozen for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimiser holds parameters of a frozen module: build it from "
                             "method.trainable_parameters()")

    # ------------------------------------------------------------------ checkpoint
    def state(self, epoch: int, next_iter: int = 0) -> dict:
        return R.training_state(self.method, self.optimizer, self.scaler, epoch=epoch, next_iter=next_iter,
                                arch=self.cfg.arch, method_name=self.cfg.method_name, args=self.cfg.args,
                                world_size=self.info.world_size, batch_size=self.cfg.batch_size,
                                save_frozen=self.cfg.save_frozen)

    def save(self, epoch: int) -> bool:
        """The epoch's regular checkpoint, when the policy (or the last epoch) asks for one."""
        pol = self.cfg.checkpoint
        if not (pol.should_save(epoch, self.cfg.epochs) or epoch + 1 == self.cfg.epochs):
            return False
        self._write(lambda: pol.write(self.state(epoch), epoch, self.cfg.epochs), f"of epoch {epoch}")
        return True

    def _write(self, write: Callable[[], str], what: str) -> None:
        """Rank 0 writes (atomically: the previous checkpoint survives a kill or a full disk); a failed
        write is the same one-line error on every rank."""
        err = ""
        if self.info.is_main:
            try:
                self.last_checkpoint = write()
            except OSError as e:
                err = (f"cannot write the checkpoint {what} in {self.cfg.checkpoint.directory}: {e.strerror or e}; "
                       f"the previous checkpoint ({self.last_checkpoint or 'none'}) is intact")
        D.agree(not err, err)

    def save_interrupted(self, epoch: int, next_iter: int, **extra) -> str:
        path = os.path.join(self.cfg.checkpoint.directory, self.cfg.checkpoint.interrupted_name)
        def write() -> str:
            save_atomic({**self.state(epoch, next_iter), **extra}, path)
            return path
        self._write(write, f"at epoch {epoch} iteration {next_iter}")
        return path

    def resume(self) -> None:
        plan, ckpt = R.decide(self.cfg.checkpoint, self.cfg.resume, self.cfg.auto_resume)
        if plan is None:
            return
        R.restore(plan, ckpt, self.method, self.optimizer, self.scaler, arch=self.cfg.arch,
                  method_name=self.cfg.method_name)
        self.start_epoch, self.start_iter = plan.epoch, plan.iter
        self.consumed = 0
        if plan.iter:
            old_w = plan.world_size or self.info.world_size
            old_b = plan.batch_size or self.cfg.batch_size
            self.consumed = plan.iter * old_b * old_w
            now = self.cfg.batch_size * self.info.world_size
            if (old_w, old_b) != (self.info.world_size, self.cfg.batch_size):
                self.start_iter = self.consumed // now
                log.warning("the checkpoint was written by %d processes x batch %d, this run has %d x %d: "
                            "the %d images of epoch %d not yet seen are split over this run's processes "
                            "(none skipped or repeated); the schedule continues at iteration %d",
                            old_w, old_b, self.info.world_size, self.cfg.batch_size,
                            max(self.sampler.total_size - self.consumed, 0), plan.epoch, self.start_iter)
        self.resumed_from = self.last_checkpoint = plan.path
        warm = ckpt.get("warmup") if isinstance(ckpt, dict) else None
        if isinstance(warm, dict) and "iter" in warm:   # stopped inside on_fresh_start: it continues
            old = (plan.batch_size or self.cfg.batch_size) * (plan.world_size or self.info.world_size)
            self._warmup_consumed = int(warm["iter"]) * old
            self.warmup_state = {**warm, "iter": self._warmup_consumed // (self.cfg.batch_size * self.info.world_size)}
        log.info("resumed from %s at epoch %d%s", plan.path, self.start_epoch,
                 f" iteration {plan.iter}" if plan.iter else
                 f", inside the warm-up after {self._warmup_consumed} images" if self.warmup_state else "")

    # ------------------------------------------------------------------ data
    def to_device(self, crops, index: torch.Tensor, epoch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        crops = [c.to(self.device, non_blocking=True, memory_format=self.memory_format) for c in crops]
        index = index.to(self.device, non_blocking=True)
        if self.batch_transform is not None:
            crops = self.batch_transform(crops, augmentation_seed(self.cfg.seed, epoch, index))
        return crops, index

    def iterate_batches(self, epoch: int, start: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor,
                                                                            torch.Tensor]]:
        consumed = start * self.cfg.batch_size * self.info.world_size
        if self.warmup_state is not None and start == self.warmup_state["iter"]:
            consumed = self._warmup_consumed   # exact also when the stopped run had other processes / batch
        self.sampler.set_epoch(epoch, consumed)
        for crops, target, index in self.loader:
            crops, index = self.to_device(crops, index, epoch)
            yield crops, target, index

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        self.resume()
        ctx = FitContext(self)
        last: dict[str, float] = {}
        try:
            with self.stop:
                if self.resumed_from is None or self.warmup_state is not None:
                    last = self._fresh_start(ctx)
                first = self.cfg.epochs if last.get("interrupted") else self.start_epoch  # stopped in the warm-up
                for epoch in range(first, self.cfg.epochs):
                    ctx.epoch = epoch
                    start_it = self.start_iter if epoch == self.start_epoch else 0
                    self.sampler.set_epoch(epoch, self.consumed if epoch == self.start_epoch else 0)
                    try:
                        self.method.on_epoch_start(epoch, ctx)
                    except StopRequested:
                        last = self._stopped_at_epoch_start(epoch, start_it)
                        break
                    last = self.train_one_epoch(epoch, start_it)
                    if last.get("interrupted"):
                        break
                    stop = self._run_monitor(epoch, last)
                    skipped = getattr(self.train_set, "num_skipped", 0)
                    if skipped:
                        log.warning("%d unreadable images skipped so far", skipped)
                    last["skipped_images"] = skipped
                    self.logger.write({"epoch": epoch, **last}, step=epoch, prefix="epoch/")
                    saved = self.save(epoch)
                    if stop or (epoch + 1 < self.cfg.epochs and self.stop.poll()):
                        path = self.last_checkpoint if saved else self.save_interrupted(epoch, 0)
                        log.warning("stopped after epoch %d (checkpoint %s); run the same command again to resume",
                                    epoch, path)
                        last["interrupted"] = 1.0
                        break
        finally:
            self.logger.close()
        if last.get("interrupted") and self.cfg.requeue and self.info.is_main:
            requeue_slurm_job()
        return last

    def _fresh_start(self, ctx: FitContext) -> dict[str, float]:
        """``on_fresh_start`` (a fresh run, or one resumed inside it). A stop at a ``FitContext.stop_point``,
        where the method's state is complete, writes a checkpoint (epoch ``start_epoch``, iteration 0)
        holding it and, under ``warmup``, the state the stop point carried (the warm-up's position and
        what the method needs to continue it)."""
        try:
            self.method.on_fresh_start(ctx)
            return {}
        except StopRequested as e:
            state = e.state
        finally:
            self.warmup_state = None
        if state is None:  # raised elsewhere in the hook: nothing new to save
            where = f"resumes from {self.last_checkpoint}" if self.last_checkpoint else "starts from scratch"
            log.warning("stopped during the fresh-start phase outside a stop point: the next run %s", where)
            return {"interrupted": 1.0}
        path = self.save_interrupted(self.start_epoch - 1, 0, warmup=state)
        log.warning("stopped in the warm-up after %d iterations (checkpoint %s); run the same command again to "
                    "continue it", state["iter"], path)
        return {"interrupted": 1.0, "warmup_iter": float(state["iter"])}

    def _stopped_at_epoch_start(self, epoch: int, start_it: int) -> dict[str, float]:
        """A stop inside ``on_epoch_start`` (PCL's E-step): the method's state is still that of the
        epoch's start, so a checkpoint at (epoch, ``start_it``) resumes exactly; the hook runs again."""
        if start_it:  # resumed mid-epoch: the checkpoint that was loaded is that very position
            path = self.last_checkpoint
        else:
            path = self.save_interrupted(epoch - 1, 0)  # "epoch - 1 finished" = epoch `epoch`, iteration 0
        log.warning("stopped at the start of epoch %d (checkpoint %s); run the same command again to resume",
                    epoch, path)
        return {"interrupted": 1.0, "next_iter": float(start_it)}

    def _run_monitor(self, epoch: int, last: dict[str, float]) -> bool:
        """The kNN monitor when due; True when a stop arrived during it (the pass is dropped)."""
        if self.knn is None or not self.knn.due(epoch, self.cfg.epochs, self.cfg.knn_freq):
            return False
        t0 = time.time()
        try:
            top1, top5 = self.knn.run(self.method, self.device, self.cfg.channels_last, should_stop=self.stop.poll)
        except StopRequested:
            log.warning("stop requested during the kNN monitor of epoch %d: pass dropped", epoch)
            return True
        last["knn_top1"], last["knn_top5"] = top1, top5
        log.info("epoch %d kNN top-1 %.2f top-5 %.2f (%.1f s)", epoch, top1, top5, time.time() - t0)
        if self.knn.check is not None:
            self.knn.check(epoch, top1)
        return False

    def _sync_means(self, sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        keys = sorted(sums)
        v = torch.stack([sums[k].float() for k in keys]) / max(n, 1)
        D.all_reduce_mean_(v)
        return dict(zip(keys, v.tolist()))

    def train_one_epoch(self, epoch: int, start_it: int = 0) -> dict[str, float]:
        from tqdm import tqdm
        self.model.train()
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        win: dict[str, torch.Tensor] = {}
        nwin, n, t0, tw = 0, 0, time.time(), time.time()
        bar = tqdm(total=self.iters, initial=start_it, desc=f"epoch {epoch}", disable=not self.info.is_main,
                   dynamic_ncols=True, mininterval=1.0)
        lr = self.lr_schedule(epoch, start_it, self.epoch_len)
        first_bad = None   # device tensor: first iteration whose loss was non-finite (no sync per step)
        for it, (crops, _, index) in enumerate(self.loader, start=start_it):
            if it >= self.iters:
                break
            lr = self.lr_schedule(epoch, it, self.epoch_len)
            crops, index = self.to_device(crops, index, epoch)
            gstep = epoch * self.epoch_len + it
            out, step = self.step(lambda: self.model(crops, index), lr, epoch, it, gstep)
            self.method.after_step(step)
            if step.nonfinite:
                self._skipped_nonfinite(out["loss"], epoch, it)
            else:
                first_bad = self._track_nonfinite(out["loss"], it, first_bad)
                for k, v in out.items():
                    v = v.float()
                    sums[k] = sums.get(k, 0) + v
                    win[k] = win.get(k, 0) + v
                n, nwin = n + 1, nwin + 1
            bar.update(1)
            if (it + 1) % cfg.print_freq == 0 or it + 1 == self.iters:
                m = self._sync_means(win, nwin)
                self._check_finite(m, epoch, it, first_bad)
                ips = nwin * cfg.batch_size * self.info.world_size / max(time.time() - tw, 1e-9)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{lr:.4g}", img_s=f"{ips:.1f}")
                self.logger.write({"epoch": epoch, "iter": it, "lr": lr, "img_per_s": ips, **m}, step=gstep,
                                  prefix="train/")
                win, nwin, tw = {}, 0, time.time()
            if it + 1 < self.iters and self.stop.due(gstep) and self.stop.poll():
                bar.close()
                path = self.save_interrupted(epoch, it + 1)
                log.warning("stopped at epoch %d iteration %d (checkpoint %s); run the same command again "
                            "to resume", epoch, it + 1, path)
                return {"interrupted": 1.0, "next_iter": float(it + 1)}
        bar.close()
        m = self._sync_means(sums, n)
        self._check_finite(m, epoch, n, first_bad)
        m["lr"] = lr
        m["epoch_time_s"] = time.time() - t0
        m["img_per_s"] = n * cfg.batch_size * self.info.world_size / max(m["epoch_time_s"], 1e-9)
        if self.device.type == "cuda":  # this process's peak so far (lightly's memory column)
            m["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        log.info("epoch %d: %s", epoch, " ".join(f"{k} {v:.4g}" for k, v in m.items()))
        return m

    @staticmethod
    def _track_nonfinite(loss: torch.Tensor, it: int, first_bad: torch.Tensor | None) -> torch.Tensor:
        bad = ~torch.isfinite(loss.detach().float())
        if first_bad is None:
            first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        return torch.where(bad & first_bad.lt(0), it, first_bad)

    def _check_finite(self, m: dict[str, float], epoch: int, it: int, first_bad: torch.Tensor | None = None) -> None:
        if not math.isfinite(m.get("loss", 0.0)):
            bad = int(first_bad) if first_bad is not None and int(first_bad) >= 0 else it
            where = self.last_checkpoint or "none written yet"
            raise NonFiniteLoss(f"loss is {m['loss']} at epoch {epoch} iteration {bad}: stopping (--skip_nonfinite N "
                                f"skips up to N such steps). Last good checkpoint: {where}")

    def _skipped_nonfinite(self, loss: torch.Tensor, epoch: int, it: int) -> None:
        self.nonfinite_skipped += 1
        if self.nonfinite_skipped > self.cfg.skip_nonfinite:
            raise NonFiniteLoss(f"loss is {float(loss)} at epoch {epoch} iteration {it}: more than --skip_nonfinite "
                                f"{self.cfg.skip_nonfinite} non-finite steps, stopping. Last good checkpoint: "
                                f"{self.last_checkpoint or 'none written yet'}")
        log.warning("non-finite loss (%s) at epoch %d iteration %d: step skipped (%d of at most %d)",
                    float(loss), epoch, it, self.nonfinite_skipped, self.cfg.skip_nonfinite)
        self.logger.write({"epoch": epoch, "iter": it, "nonfinite_skipped": self.nonfinite_skipped},
                          step=epoch * self.epoch_len + it, prefix="train/")
