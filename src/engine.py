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
        self.iters = len(self.loader) if cfg.max_iters is None else min(cfg.max_iters, len(self.loader))
        if info.distributed:
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                method, device_ids=[self.device.index] if cuda else None, forward_sync_buffers=False,
                find_unused_parameters=cfg.find_unused_parameters)
        else:
            self.model = method
        self.logger = RunLogger(cfg.output_dir, active=info.is_main)
        self.start_epoch = 0
        self.last_checkpoint: str | None = None

    # ------------------------------------------------------------------ checkpoint
    def state(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch + 1, "arch": self.cfg.arch, "method": self.cfg.method_name,
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
        D.barrier()

    def resume(self) -> None:
        path = self.cfg.resume or (self.cfg.checkpoint.latest() if self.cfg.auto_resume else None)
        if not path:
            return
        ckpt = load_checkpoint(path)
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
        self.last_checkpoint = path
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        self.resume()
        last: dict[str, float] = {}
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                self.sampler.set_epoch(epoch)
                self.method.on_epoch_start(epoch, self)
                last = self.train_one_epoch(epoch)
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
        return last

    def _sync_means(self, sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        keys = sorted(sums)
        v = torch.stack([sums[k].float() for k in keys]) / max(n, 1)
        D.all_reduce_mean_(v)
        vals = v.tolist()
        return dict(zip(keys, vals))

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm import tqdm
        self.model.train()
        cfg, dev = self.cfg, self.device
        sums: dict[str, torch.Tensor] = {}
        win: dict[str, torch.Tensor] = {}
        nwin, n, t0, tw = 0, 0, time.time(), time.time()
        bar = tqdm(total=self.iters, desc=f"epoch {epoch}", disable=not self.info.is_main, dynamic_ncols=True,
                   mininterval=1.0)
        for it, (crops, _, index) in enumerate(self.loader):
            if it >= self.iters:
                break
            lr = self.lr_schedule(epoch, it, self.iters if cfg.max_iters is None else len(self.loader))
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
