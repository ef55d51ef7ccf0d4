"""The one training loop all ``main_*.py`` share.

Per iteration: lr from the schedule → forward under autocast → non-finite check (batched, at log
time) → backward (GradScaler under fp16) → unscale (LARC/LARS need true gradients) → step →
``method.after_step()``. Per epoch: ``method.on_epoch_start(epoch)``, optional kNN monitor, logs,
an atomic checkpoint. Resume restores model (queue, ``u``, memory ...), optimiser, scaler, RNG and
the epoch, so a killed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from . import distributed as D
from .checkpoint import latest_checkpoint, link_or_copy, load_checkpoint, save_atomic
from .data.datasets import EpochSampler, collate_crops
from .errors import UserError
from .eval.features import extract_features
from .eval.knn import knn_accuracy
from .logger import RunLogger
from .methods.base import ContrastiveMethod
from .optim import set_lr

log = logging.getLogger("ssl")


class NonFiniteLoss(UserError):
    pass


# ----------------------------------------------------------------------------- checkpoint policy
@dataclass
class CheckpointPolicy:
    """Where and when checkpoints are written. ``filename(epoch)`` names the file for the (0-based)
    epoch just finished; ``copies(epoch, epochs)`` lists extra paths to hard-link it to;
    ``should_save(epoch, epochs)`` decides whether to write at all (the last epoch always is)."""
    directory: str
    filename: Callable[[int], str] = lambda e: f"checkpoint_{e:04d}.pth.tar"
    should_save: Callable[[int, int], bool] = lambda e, n: True
    copies: Callable[[int, int], list[str]] = lambda e, n: []
    resume_pattern: str = r"checkpoint_(\d+)\.pth\.tar"
    fixed_resume_name: str | None = None  # e.g. LORAC's checkpoint.pth.tar

    #: written when a run is stopped by SIGUSR1/SIGTERM in the middle of an epoch
    interrupted_name: str = "checkpoint_interrupted.pth.tar"

    def latest(self) -> str | None:
        if self.fixed_resume_name:
            p = os.path.join(self.directory, self.fixed_resume_name)
            return p if os.path.isfile(p) else None
        return latest_checkpoint(self.directory, self.resume_pattern)


@dataclass
class EngineConfig:
    epochs: int
    batch_size: int                # per process
    output_dir: str
    checkpoint: CheckpointPolicy
    method_name: str
    arch: str
    args: dict = field(default_factory=dict)
    workers: int = 4
    print_freq: int = 10
    amp: str | None = None         # None | "fp16" | "bf16" (CUDA only; fp32 on CPU)
    channels_last: bool = False
    resume: str | None = None
    auto_resume: bool = True
    seed: int = 0
    knn_freq: int = 0              # epochs between kNN monitor runs (0: never)
    knn_k: int = 20
    knn_t: float = 0.2
    knn_batch_size: int = 256
    find_unused_parameters: bool = False
    max_iters: int | None = None   # stop each epoch after this many iterations (smoke tests)
    start_epoch: int = 0           # first epoch when not resuming (a resumed checkpoint overrides it)


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    st = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": {"key": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                     "has_gauss": int(st[3]), "gauss": float(st[4])}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"].cpu())
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"].cpu())


def seed_everything(seed: int) -> None:
    """Same seed on every rank (as the official code): identical init and shuffle permutations."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- kNN monitor
@dataclass
class KnnMonitor:
    bank: Dataset
    queries: Dataset
    num_classes: int

    def run(self, method: ContrastiveMethod, cfg: EngineConfig, device: torch.device) -> tuple[float, float]:
        for b in method.buffers():  # BN running stats may differ across ranks (broadcast_buffers=False)
            D.broadcast_(b, 0)
        net = method.backbone()
        fb, yb = extract_features(net, self.bank, cfg.knn_batch_size, cfg.workers, device,
                                  channels_last=cfg.channels_last, gather=False)  # bank stays sharded
        fq, yq = extract_features(net, self.queries, cfg.knn_batch_size, cfg.workers, device,
                                  channels_last=cfg.channels_last)
        return knn_accuracy(fb, yb, fq, yq, self.num_classes, cfg.knn_k, cfg.knn_t, sharded=True)


# ----------------------------------------------------------------------------- the loop
class Trainer:
    def __init__(self, method: ContrastiveMethod, optimizer: torch.optim.Optimizer,
                 lr_schedule: Callable[[int, int, int], float], train_set: Dataset, cfg: EngineConfig,
                 info: D.DistInfo, knn: KnnMonitor | None = None):
        self.method, self.optimizer, self.lr_schedule, self.cfg, self.info, self.knn = \
            method, optimizer, lr_schedule, cfg, info, knn
        self.device = info.device
        cuda = self.device.type == "cuda"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.amp or "", None) if cuda else None
        if cfg.amp and not cuda:
            log.info("--%s requested but no GPU: training in fp32", cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        self.sampler = EpochSampler(len(train_set), info.world_size, info.rank, shuffle=True, seed=cfg.seed)
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
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                method, device_ids=[self.device.index] if cuda else None, forward_sync_buffers=False,
                find_unused_parameters=cfg.find_unused_parameters)
        else:
            self.model = method
        self.logger = RunLogger(cfg.output_dir, active=info.is_main)
        self.start_epoch = cfg.start_epoch
        self.start_iter = 0          # > 0 when resuming in the middle of an epoch
        self.last_checkpoint: str | None = None
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ checkpoint
    @property
    def resumed_mid_epoch(self) -> bool:
        return self.start_iter > 0

    def state(self, epoch: int, next_iter: int = 0) -> dict[str, Any]:
        """``epoch`` is the next epoch to run (official meaning); ``iter`` > 0 only in a checkpoint
        written in the middle of an epoch (then ``epoch`` is the interrupted one)."""
        return {"epoch": epoch if next_iter else epoch + 1, "iter": next_iter,
                "arch": self.cfg.arch, "method": self.cfg.method_name,
                "state_dict": {f"module.{k}": v for k, v in self.method.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(), "args": self.cfg.args, **self.method.extra_checkpoint_items()}

    def save(self, epoch: int) -> None:
        pol = self.cfg.checkpoint
        last = epoch + 1 == self.cfg.epochs
        if not (pol.should_save(epoch, self.cfg.epochs) or last):
            return
        if self.info.is_main:
            path = os.path.join(pol.directory, pol.filename(epoch))
            save_atomic(self.state(epoch), path)
            for c in pol.copies(epoch, self.cfg.epochs):
                os.makedirs(os.path.dirname(c), exist_ok=True)
                link_or_copy(path, c)
            self.last_checkpoint = path
            stale = os.path.join(pol.directory, pol.interrupted_name)
            if os.path.exists(stale):  # superseded by this end-of-epoch checkpoint
                os.unlink(stale)
        D.barrier()

    def save_interrupted(self, epoch: int, next_iter: int) -> str:
        path = os.path.join(self.cfg.checkpoint.directory, self.cfg.checkpoint.interrupted_name)
        if self.info.is_main:
            save_atomic(self.state(epoch, next_iter), path)
        D.barrier()
        return path

    def _resume_source(self) -> tuple[str | None, dict | None]:
        """(path, loaded checkpoint): ``--resume``, else the newest of the policy's checkpoint and
        an interrupted one. Each file is read once."""
        if self.cfg.resume or not self.cfg.auto_resume:
            return self.cfg.resume, (load_checkpoint(self.cfg.resume) if self.cfg.resume else None)
        regular = self.cfg.checkpoint.latest()
        inter = os.path.join(self.cfg.checkpoint.directory, self.cfg.checkpoint.interrupted_name)
        cands = [(p, load_checkpoint(p)) for p in (regular, inter) if p and os.path.isfile(p)]
        if not cands:
            return None, None
        pos = lambda c: (int(c["epoch"]), int(c.get("iter", 0))) if isinstance(c, dict) and "epoch" in c else (-1, 0)  # noqa: E731
        return max(cands, key=lambda pc: pos(pc[1]))

    def resume(self) -> None:
        path, ckpt = self._resume_source()
        if not path:
            return
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "optimizer" not in ckpt:
            raise UserError(f"{path} is not a training checkpoint of this repository (no state_dict/optimizer)")
        if ckpt.get("method", self.cfg.method_name) != self.cfg.method_name or ckpt.get("arch", self.cfg.arch) != self.cfg.arch:
            raise UserError(f"{path} was written by {ckpt.get('method')} / {ckpt.get('arch')}, not "
                            f"{self.cfg.method_name} / {self.cfg.arch}: use another --output_dir or --resume")
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt["state_dict"].items()}
        try:
            sd = self.method.state_dict_from_checkpoint(sd, ckpt)
            self.method.load_state_dict(sd, strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from e
        if "scaler" in ckpt and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"])
        self.start_epoch = int(ckpt["epoch"])
        self.start_iter = int(ckpt.get("iter", 0))
        self.last_checkpoint = path
        log.info("resumed from %s at epoch %d%s", path, self.start_epoch,
                 f" iteration {self.start_iter}" if self.start_iter else "")

    # ------------------------------------------------------------------ preemption
    def _install_signal_handlers(self) -> dict:
        """SIGUSR1 (SLURM's ``--signal``) and SIGTERM (preemption, ``scancel``) ask for a stop: the
        run writes ``checkpoint_interrupted.pth.tar`` at the next logging point and returns; the same
        command resumes it exactly, in the middle of the epoch."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self._stop_signal = signum
            log.warning("received signal %d: checkpointing at the next logging point", signum)
        old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.device)
        return bool(D.all_reduce_sum_(flag).item() > 0)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        self.resume()
        last: dict[str, float] = {}
        handlers = self._install_signal_handlers()
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                start_it = self.start_iter if epoch == self.start_epoch else 0
                self.sampler.set_epoch(epoch, skip=start_it * self.cfg.batch_size)
                self.method.on_epoch_start(epoch, self)
                last = self.train_one_epoch(epoch, start_it)
                self.start_iter = 0
                if last.get("interrupted"):
                    log.warning("stopped at epoch %d iteration %d; run the same command again to resume",
                                epoch, int(last["next_iter"]))
                    break
                if self.knn is not None and self.cfg.knn_freq and \
                        ((epoch + 1) % self.cfg.knn_freq == 0 or epoch + 1 == self.cfg.epochs):
                    last["knn_top1"], last["knn_top5"] = self.knn.run(self.method, self.cfg, self.device)
                    log.info("epoch %d kNN top-1 %.2f top-5 %.2f", epoch, last["knn_top1"], last["knn_top5"])
                skipped = getattr(self.train_set, "num_skipped", 0)
                if skipped:
                    log.warning("%d unreadable images skipped so far", skipped)
                last["skipped_images"] = skipped
                self.logger.write({"epoch": epoch, **last}, step=epoch, prefix="epoch/")
                self.save(epoch)
        finally:
            self.logger.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return last

    def _sync_means(self, sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        keys = sorted(sums)
        v = torch.stack([sums[k].float() for k in keys]) / max(n, 1)
        D.all_reduce_mean_(v)
        vals = v.tolist()
        return dict(zip(keys, vals))

    def train_one_epoch(self, epoch: int, start_it: int = 0) -> dict[str, float]:
        from tqdm import tqdm
        self.model.train()
        cfg, dev = self.cfg, self.device
        sums: dict[str, torch.Tensor] = {}
        win: dict[str, torch.Tensor] = {}
        nwin, n, t0, tw = 0, 0, time.time(), time.time()
        bar = tqdm(total=self.iters, initial=start_it, desc=f"epoch {epoch}", disable=not self.info.is_main,
                   dynamic_ncols=True, mininterval=1.0)
        lr = self.lr_schedule(epoch, start_it, self.epoch_len)
        for it, (crops, _, index) in enumerate(self.loader, start=start_it):
            if it >= self.iters:
                break
            lr = self.lr_schedule(epoch, it, self.epoch_len)
            set_lr(self.optimizer, lr)
            if isinstance(crops, torch.Tensor):
                crops = [crops]
            crops = [c.to(dev, non_blocking=True, memory_format=self.memory_format) for c in crops]
            index = index.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                out = self.model(crops, index)
            loss = out["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.method.after_step()
            for k, v in out.items():
                v = v.detach().float()
                sums[k] = sums.get(k, 0) + v
                win[k] = win.get(k, 0) + v
            n, nwin = n + 1, nwin + 1
            bar.update(1)
            if (it + 1) % cfg.print_freq == 0 or it + 1 == self.iters:
                m = self._sync_means(win, nwin)
                self._check_finite(m, epoch, it)
                ips = nwin * cfg.batch_size * self.info.world_size / max(time.time() - tw, 1e-9)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{lr:.4g}", img_s=f"{ips:.1f}")
                step = epoch * self.iters + it
                self.logger.write({"epoch": epoch, "iter": it, "lr": lr, "img_per_s": ips, **m}, step=step, prefix="train/")
                win, nwin, tw = {}, 0, time.time()
                if it + 1 < self.iters and self._stop_requested():
                    bar.close()
                    path = self.save_interrupted(epoch, it + 1)
                    log.warning("checkpoint of epoch %d iteration %d written to %s", epoch, it + 1, path)
                    return {"interrupted": 1.0, "next_iter": float(it + 1)}
        bar.close()
        m = self._sync_means(sums, n)
        self._check_finite(m, epoch, n)
        m["lr"] = lr
        m["epoch_time_s"] = time.time() - t0
        m["img_per_s"] = n * cfg.batch_size * self.info.world_size / max(m["epoch_time_s"], 1e-9)
        log.info("epoch %d: %s", epoch, " ".join(f"{k} {v:.4g}" for k, v in m.items()))
        return m

    def _check_finite(self, m: dict[str, float], epoch: int, it: int) -> None:
        if not math.isfinite(m.get("loss", 0.0)):
            where = self.last_checkpoint or "none written yet"
            raise NonFiniteLoss(f"loss is {m['loss']} at epoch {epoch} iteration {it}: stopping. "
                                f"Last good checkpoint: {where}")
