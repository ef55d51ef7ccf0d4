"""Training and evaluation of the C4 detector (``detection/train_torchvision.py``; disco_pcl_evals.md C5).

- Solver: SGD (``SOLVER.MOMENTUM``), weight decay ``WEIGHT_DECAY`` except the norm layers'
  ``WEIGHT_DECAY_NORM`` (0, Detectron2's default) and biases' ``WEIGHT_DECAY_BIAS``; lr
  ``BASE_LR · γ^{#steps ≤ it} · w(it)`` with the linear warm-up ``w = f + (1 − f)·it/WARMUP_ITERS``
  below ``WARMUP_ITERS`` (f = ``WARMUP_FACTOR``), Detectron2's ``WarmupMultiStepLR``.
- One step is the engine's :class:`~src.engine.TrainStep` (AMP, GradScaler); losses are averaged
  over the processes every iteration for logging and the non-finite check.
- PreciseBN (``TEST.PRECISE_BN``): before every evaluation and before ``model_final.pth``, every
  trainable BatchNorm is reset and re-estimated as the plain average of the batch statistics of
  ``NUM_ITER`` training batches (train mode, no gradient; fvcore's ``update_bn_stats``).
- Checkpoints (rank 0, atomic): ``model_{iter:07d}.pth`` every ``CHECKPOINT_PERIOD`` iterations
  (Detectron2's names: the 0-based iteration just done), ``model_final.pth`` at the end,
  ``model_interrupted.pth`` on SIGTERM/SIGUSR1, and ``last_checkpoint`` naming the newest one. Each
  holds the model, optimizer, scaler, RNG, seed and next iteration: a resumed run continues the same
  data stream and schedule.
- Evaluation: each process predicts its shard of the test images; rank 0 computes VOC (VOC07 11-point
  for 2007, area for other years) or COCO AP (:mod:`src.eval.detection`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .. import distributed as D
from ..checkpoint import load_checkpoint, save_atomic
from ..data.datasets import ShardSampler
from ..engine import NonFiniteLoss, StopSignal, TrainStep, rng_state, set_rng_state
from ..errors import UserError
from ..eval.detection import coco_evaluate, voc_evaluate
from ..logger import RunLogger
from .config import get
from .data import DatasetInfo, DetectionDataset, IterationSampler, collate

log = logging.getLogger("ssl")
KIND = "c4_detector"
#: torchvision's loss names → Detectron2's (what the logs and TensorBoard show)
LOSS_NAMES = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_loc",
              "loss_cls": "loss_cls", "loss_box_reg": "loss_box_reg"}
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
PRECISE_BN_SEED = 10_007  # the PreciseBN batches come from their own stream (seed + this), as Detectron2's own loader


# ----------------------------------------------------------------------------- solver
def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.SGD:
    """SGD with Detectron2's weight-decay groups (norm layers, biases, the rest)."""
    wd, wd_norm, wd_bias = (get(cfg, f"SOLVER.{k}") for k in ("WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "WEIGHT_DECAY_BIAS"))
    groups: dict[float, list] = {}
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            decay = wd_norm if isinstance(module, NORM_TYPES) else wd_bias if name == "bias" else wd
            groups.setdefault(decay, []).append(p)
    lr = get(cfg, "SOLVER.BASE_LR")
    return torch.optim.SGD([{"params": ps, "weight_decay": d} for d, ps in groups.items()], lr=lr,
                           momentum=get(cfg, "SOLVER.MOMENTUM"))


def lr_at(cfg: dict, it: int) -> float:
    """Detectron2's ``WarmupMultiStepLR`` at iteration ``it`` (0-based; module docstring)."""
    lr = get(cfg, "SOLVER.BASE_LR") * get(cfg, "SOLVER.GAMMA") ** bisect_right(sorted(get(cfg, "SOLVER.STEPS")), it)
    warm = get(cfg, "SOLVER.WARMUP_ITERS")
    if it < warm:
        alpha = it / warm
        lr *= get(cfg, "SOLVER.WARMUP_FACTOR") * (1 - alpha) + alpha
    return lr


@torch.no_grad()
def precise_bn_(model: nn.Module, batches: Iterator, num_iter: int, device: torch.device, autocast) -> int:
    """Re-estimate every trainable BatchNorm's statistics as the average over ``num_iter`` batches
    (cumulative averaging, ``momentum=None``); averaged over the processes when BN is not synchronised.
    Returns the number of BN layers updated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or num_iter <= 0:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was = model.training
    model.train()
    for _ in range(num_iter):
        images, targets, _ = next(batches)
        with autocast():
            model(*to_device(images, targets, device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was)
    if not any(isinstance(m, nn.SyncBatchNorm) for m in bns):
        D.sync_bn_stats_(model)
    return len(bns)


def to_device(images, targets, device):
    return ([im.to(device, non_blocking=True) for im in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(out_dir: str, name: str, net: nn.Module, optimizer, scaler, next_iter: int, meta: dict) -> str:
    """Rank 0 writes ``name`` and points ``last_checkpoint`` at it; every rank waits."""
    path = os.path.join(out_dir, name)
    if D.is_main_process():
        save_atomic({"kind": KIND, "iteration": next_iter, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rng_state(), "world_size": D.get_world_size(), **meta}, path)
        tmp = os.path.join(out_dir, ".last_checkpoint.tmp")
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, os.path.join(out_dir, "last_checkpoint"))
    D.barrier()
    return path


def last_checkpoint(out_dir: str) -> str | None:
    marker = os.path.join(out_dir, "last_checkpoint")
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        path = os.path.join(out_dir, f.read().strip())
    return path if os.path.isfile(path) else None


def load_detector_checkpoint(path: str, net: nn.Module, arch: str, optimizer=None, scaler=None) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` (model strict; optimizer, scaler, RNG)."""
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or ck.get("kind") != KIND:
        raise UserError(f"{path} is not a detector checkpoint written by train_torchvision.py")
    if ck.get("arch") != arch:
        raise UserError(f"{path} holds a {ck.get('arch')} detector, this run builds {arch} (MODEL.RESNETS.DEPTH)")
    try:
        net.load_state_dict(ck["model"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(ck["optimizer"])
            scaler.load_state_dict(ck["scaler"])
            set_rng_state(ck["rng"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from e
    return ck


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(net: nn.Module, info: DatasetInfo, device: torch.device, batch_size: int, workers: int, autocast) -> dict:
    """Detections of every test image (this process: its shard), gathered on every rank: ``{index: {boxes, scores, labels}}``."""
    ds = DetectionDataset(info.records, train=False)
    loader = DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), D.get_world_size(), D.get_rank()),
                        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
    was = net.training
    net.eval()
    preds = {}
    for images, targets, idx in loader:
        with autocast():
            outs = net([im.to(device, non_blocking=True) for im in images])
        for i, o, t in zip(idx, outs, targets):
            if not t.get("unreadable"):
                preds[int(i)] = {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                                 for k, v in o.items()}
    net.train(was)
    if D.is_dist():
        parts = [None] * D.get_world_size()
        dist.all_gather_object(parts, preds, group=D.cpu_group())
        preds = {k: v for p in parts for k, v in p.items()}
    return preds


def evaluate(net: nn.Module, infos: list[DatasetInfo], device: torch.device, batch_size: int, workers: int,
             autocast) -> dict:
    """``{dataset name: metrics}`` on every rank (rank 0 computes the AP, then broadcasts)."""
    results = {}
    for info in infos:
        t0 = time.time()
        preds = predict(net, info, device, batch_size, workers, autocast)
        res, err = None, None
        if D.is_main_process():
            try:
                if info.is_voc:
                    res = voc_evaluate(preds, info.records, info.classes, use_07_metric=info.year == 2007)
                else:
                    res = coco_evaluate(preds, info.records, info.coco_json, info.category_ids)
            except ValueError as e:
                err = f"{info.name}: {e}"
            else:
                log.info("%s (%d images, %.0f s): %s", info.name, len(info.records), time.time() - t0,
                         " ".join(f"{k} {v:.2f}" for k, v in res.items() if isinstance(v, float)))
        res, err = D.broadcast_object((res, err))  # every rank stops on the same error
        if err:
            raise UserError(err)
        results[info.name] = res
    return results


# ----------------------------------------------------------------------------- training
@dataclass
class Run:
    """One training run: everything :func:`train` works with."""
    cfg: dict
    info: D.DistInfo
    model: nn.Module            # DDP-wrapped when distributed
    net: nn.Module              # the detector itself
    optimizer: torch.optim.Optimizer
    step: TrainStep
    train_set: DetectionDataset
    tests: list[DatasetInfo]
    logger: RunLogger
    out_dir: str
    meta: dict                  # arch, seed, cfg: saved in every checkpoint
    start_iter: int
    per_process_batch: int
    workers: int
    test_batch_size: int
    print_freq: int = 20

    def loader(self, seed: int, start_iter: int) -> Iterator:
        sampler = IterationSampler(len(self.train_set), self.per_process_batch, self.info.world_size, self.info.rank,
                                   seed, start_iter)
        return iter(DataLoader(self.train_set, batch_size=self.per_process_batch, sampler=sampler, num_workers=self.workers,
                               collate_fn=collate, pin_memory=self.info.device.type == "cuda",
                               generator=torch.Generator().manual_seed(seed)))  # the global RNG stays untouched

    def save(self, name: str, next_iter: int) -> str:
        return save_checkpoint(self.out_dir, name, self.net, self.optimizer, self.step.scaler, next_iter, self.meta)

    def precise_bn(self) -> None:
        if get(self.cfg, "TEST.PRECISE_BN.ENABLED"):
            n = get(self.cfg, "TEST.PRECISE_BN.NUM_ITER")
            k = precise_bn_(self.net, self.loader(self.meta["seed"] + PRECISE_BN_SEED, 0), n, self.info.device,
                            self.step.autocast)
            log.info("PreciseBN: statistics of %d BatchNorm layers re-estimated over %d batches", k, n)

    def evaluate(self, it: int) -> dict:
        res = evaluate(self.net, self.tests, self.info.device, self.test_batch_size, self.workers, self.step.autocast)
        self.logger.write({"iter": it, **{f"{d}/{k}": v for d, m in res.items() for k, v in m.items()
                                          if isinstance(v, float)}}, step=it, prefix="eval/")
        return res


def train(run: Run, stop: StopSignal) -> dict | None:
    """Iterations ``start_iter … MAX_ITER − 1``; then PreciseBN, ``model_final.pth`` and the evaluation.
    Returns the results (None when a stop signal ended the run early)."""
    from tqdm import tqdm
    cfg, dev = run.cfg, run.info.device
    max_iter, period = get(cfg, "SOLVER.MAX_ITER"), get(cfg, "SOLVER.CHECKPOINT_PERIOD")
    eval_period = get(cfg, "TEST.EVAL_PERIOD")
    batches = run.loader(run.meta["seed"], run.start_iter) if run.start_iter < max_iter else None
    bar = tqdm(total=max_iter, initial=run.start_iter, desc="detection", disable=not run.info.is_main,
               dynamic_ncols=True, mininterval=1.0)
    run.model.train()
    win, nwin, t0 = None, 0, time.time()
    for it in range(run.start_iter, max_iter):
        images, targets = to_device(*next(batches)[:2], dev)
        lr = lr_at(cfg, it)

        def loss_fn(images=images, targets=targets):
            losses = run.model(images, targets)
            out = {LOSS_NAMES.get(k, k): v.float() for k, v in losses.items()}
            return {"loss": sum(out.values()), **out}
        out, _ = run.step(loss_fn, lr, 0, it, it)
        v = torch.stack([out[k] for k in sorted(out)])
        win, nwin = (v if win is None else win + v), nwin + 1
        bar.update(1)
        if (it + 1) % run.print_freq == 0 or it + 1 == max_iter:
            m = dict(zip(sorted(out), (D.all_reduce_mean_(win / nwin)).tolist()))
            if not math.isfinite(m["loss"]):
                raise NonFiniteLoss(f"loss is {m['loss']} at iteration {it}: stopping (last good checkpoint: "
                                    f"{last_checkpoint(run.out_dir) or 'none'}); lower SOLVER.BASE_LR")
            ips = nwin * run.per_process_batch * run.info.world_size / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{lr:.4g}", img_s=f"{ips:.1f}")
            run.logger.write({"iter": it, "lr": lr, "img_per_s": ips, **m}, step=it, prefix="train/")
            win, nwin, t0 = None, 0, time.time()
        done = it + 1
        if period and done % period == 0 and done < max_iter:
            run.save(f"model_{it:07d}.pth", done)
        if eval_period and done % eval_period == 0 and done < max_iter:
            run.precise_bn()
            run.evaluate(it)
        if done < max_iter and stop.due(it) and stop.poll():
            bar.close()
            path = run.save("model_interrupted.pth", done)
            log.warning("stopped at iteration %d (checkpoint %s); run the same command again to resume", done, path)
            return None
    bar.close()
    if run.start_iter < max_iter:  # a run resumed from model_final.pth only evaluates again
        run.precise_bn()
        run.save("model_final.pth", max_iter)
    res = run.evaluate(max_iter)
    if run.info.is_main:
        with open(os.path.join(run.out_dir, "results.json"), "w") as f:
            json.dump(res, f, indent=2)
    return res
