"""Linear probe on a frozen backbone (``eval_linear.py``): the classifier, the per-epoch lr, one
training epoch, distributed validation, the backbone sanity check and the head checkpoint.

The backbone stays in ``eval()`` the whole time (BatchNorm uses its running statistics), runs under
``no_grad`` and is never wrapped in DDP; only the classifier is trained (moco_m_lorac.md §6-7,
sogclr_caco.md A7/B7, disco_pcl_evals.md C2). The classifier is initialised N(0, 0.01), bias 0.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import distributed as D
from ..checkpoint import load_backbone, load_checkpoint
from ..data.datasets import EpochSampler, collate_crops
from .features import make_eval_loader
from ..errors import UserError
from ..models.backbones import arch_spec, build_backbone
from ..engine.preemption import StopSignal
from ..engine.step import TrainStep
from ..optim import LARC
from .linear_presets import Recipe

log = logging.getLogger("ssl")
HEAD_KIND = "linear_head"
FINETUNE_KIND = "finetune"
#: run checkpoints of the evaluation scripts: kind → (name in messages, script writing it, its default --dump_path)
RUN_KINDS = {HEAD_KIND: ("linear-head", "eval_linear.py", "linear_eval"),
             FINETUNE_KIND: ("fine-tuning", "eval_semi.py", "semi_eval")}


# ----------------------------------------------------------------------------- models
def frozen_backbone(pretrained: str, arch: str, *, cifar_stem: bool = False, global_pooling: bool = True) -> nn.Module:
    """``load_backbone`` (any known layout, strict on every backbone key, CIFAR stem detected from the
    checkpoint) or, without ``pretrained``, a random backbone. Frozen and in eval mode. Without
    global pooling the ResNet returns its flattened last feature map (SwAV's ``eval_mode``)."""
    if pretrained:
        net = load_backbone(pretrained, arch)
        log.info("loaded backbone %s from %s (key prefix %r, %s stem)", arch, pretrained,
                 getattr(net, "loaded_prefix", ""), "CIFAR" if _has_cifar_conv(net) else "ImageNet")
    else:
        net = build_backbone(arch, cifar_stem=cifar_stem)
        log.warning("no --pretrained given: evaluating a RANDOMLY INITIALISED %s backbone", arch)
    if not global_pooling:
        if arch_spec(arch).family != "resnet":
            raise UserError("--global_pooling false is only available for ResNet archs")
        net.avgpool = nn.Identity()
    net.requires_grad_(False)
    return net.eval()


def _has_cifar_conv(net: nn.Module) -> bool:
    conv = getattr(net, "conv1", None)
    return isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)


class LinearClassifier(nn.Module):
    """SwAV/LORAC ``RegLog`` (moco_m_lorac.md §6), which with global pooling is MoCo's ``fc``:
    Linear(feat_dim, C). Without global pooling: AvgPool2d(6, stride 1) on the feature map
    (+ BatchNorm2d if ``use_bn``), flattened (8192-d for ResNet-50 at 224 px)."""

    def __init__(self, feat_dim: int, num_classes: int, global_pooling: bool = True, use_bn: bool = False,
                 map_size: int = 7):
        super().__init__()
        self.feat_dim, self.global_pooling = feat_dim, global_pooling
        self.bn = None
        in_dim = feat_dim
        if not global_pooling:
            if map_size < 6:
                raise UserError(f"--global_pooling false needs a feature map of at least 6x6 (got {map_size}x{map_size}: "
                                "use a larger --image_size)")
            self.av_pool = nn.AvgPool2d((6, 6), stride=1)
            in_dim = feat_dim * (map_size - 5) ** 2
            if use_bn:
                self.bn = nn.BatchNorm2d(feat_dim)
        self.linear = nn.Linear(in_dim, num_classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.global_pooling:
            h = int(round(math.sqrt(x.shape[1] // self.feat_dim)))
            x = self.av_pool(x.view(x.shape[0], self.feat_dim, h, h))
            if self.bn is not None:
                x = self.bn(x)
            x = x.flatten(1)
        return self.linear(x)


def feature_map_size(backbone: nn.Module, feat_dim: int, image_size: int, device: torch.device) -> int:
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    return int(round(math.sqrt(out.shape[1] // feat_dim)))


def build_optimizer(params, r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "larc":  # CaCo linear.py: SGD wrapped in LARC (sogclr_caco.md B7)
        return LARC(params, r.lr, momentum=r.momentum, weight_decay=r.wd, trust_coefficient=0.001, clip=False,
                    eps=1e-8, nesterov=r.nesterov)
    if r.optimizer != "sgd":
        raise UserError(f"unknown --optimizer {r.optimizer!r} (sgd or larc)")
    return torch.optim.SGD(params, r.lr, momentum=r.momentum, weight_decay=r.wd, nesterov=r.nesterov)


def epoch_lr(r: Recipe, epoch: int) -> float:
    """Per-epoch lr. step: lr·γ^{#milestones ≤ epoch} (MoCo ``adjust_learning_rate``, MultiStepLR);
    cosine: final + ½(lr − final)(1 + cos(π·epoch/epochs)) (CosineAnnealingLR; MoCo v3 lincls);
    constant: lr."""
    if r.scheduler == "step":
        return r.lr * r.gamma ** sum(epoch >= m for m in r.milestones)
    if r.scheduler == "cosine":
        return r.final_lr + 0.5 * (r.lr - r.final_lr) * (1.0 + math.cos(math.pi * epoch / r.epochs))
    if r.scheduler == "constant":
        return r.lr
    raise UserError(f"unknown scheduler {r.scheduler!r} (step, cosine or constant)")


# ----------------------------------------------------------------------------- loops
def _correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y.view(-1, 1))
    return top[:, 0].sum().double(), top.any(1).sum().double()


def _summarise(sums: torch.Tensor) -> dict[str, float]:
    """sums = [loss·n, correct@1, correct@5, n] summed over ranks → means in percent."""
    D.all_reduce_sum_(sums)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "n": int(n)}


def train_one_epoch(backbone: nn.Module, head: nn.Module, loader: DataLoader, step: TrainStep, lr: float,
                    epoch: int, device: torch.device, max_iters: int | None = None, print_freq: int = 10,
                    stop: StopSignal | None = None, start_it: int = 0,
                    after_step: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Backbone in eval mode under no_grad; cross-entropy on the head through the engine's
    :class:`TrainStep` (AMP, GradScaler). Returns sample-weighted loss / top-1 / top-5 of the
    iterations run, over all ranks; with ``interrupted`` = 1 and ``next_iter`` when a stop signal
    arrived (polled collectively every ``stop.every`` iterations). ``after_step(epoch, it)`` runs
    after every step (the ``--mi_every`` tracker)."""
    backbone.eval()
    head.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    iters = len(loader) + start_it if max_iters is None else min(max_iters, len(loader) + start_it)
    t0 = time.time()
    out: dict[str, float] = {}
    for it, (x, y, _) in enumerate(loader, start=start_it):
        if it >= iters:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        def loss_fn():
            with torch.no_grad():
                f = backbone(x)
            logits = head(f.float() if f.dtype != torch.float32 else f)
            return {"loss": F.cross_entropy(logits.float(), y), "logits": logits}
        res, _ = step(loss_fn, lr, epoch, it, it)
        c1, c5 = _correct(res["logits"], y)
        sums += torch.stack([res["loss"].double() * y.shape[0], c1, c5,
                             torch.tensor(y.shape[0], device=device, dtype=torch.float64)])
        if D.is_main_process() and ((it + 1) % print_freq == 0 or it + 1 == iters):
            log.info("epoch %d [%d/%d] loss %.4f lr %.4g %.1f img/s (this process)", epoch, it + 1, iters,
                     res["loss"].item(), lr, float(sums[3]) / max(time.time() - t0, 1e-9))
        if after_step is not None:
            after_step(epoch, it)
        if stop is not None and it + 1 < iters and stop.due(it) and stop.poll():
            out = {"interrupted": 1.0, "next_iter": float(it + 1)}
            break
    m = _summarise(sums)  # all ranks see the same numbers, so all stop together
    if not math.isfinite(m["loss"]):
        raise UserError(f"linear-probe loss is {m['loss']} at epoch {epoch}: lower --lr")
    return {**m, **out}


@torch.no_grad()
def validate(backbone: nn.Module, head: nn.Module, dataset: Dataset, batch_size: int, workers: int,
             device: torch.device) -> dict[str, float]:
    """Loss, top-1, top-5 over the whole ``dataset``: every rank reads its own shard
    (:class:`ShardSampler`, no duplicates) and the counts are summed, so every rank gets the exact
    full-set numbers (the same as one process evaluating everything)."""
    backbone.eval()
    head.eval()
    loader = make_eval_loader(dataset, batch_size, workers, device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    net = head.module if hasattr(head, "module") else head
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = net(backbone(x))
        c1, c5 = _correct(logits, y)
        loss = F.cross_entropy(logits, y, reduction="sum").double()
        sums += torch.stack([loss, c1, c5, torch.tensor(y.shape[0], device=device, dtype=torch.float64)])
    return _summarise(sums)


def epoch_iterations(n: int, per_process_batch: int, world_size: int, max_iters: int | None = None) -> int:
    """Iterations of one epoch of :func:`make_train_loader` (padded shards, last batch kept)."""
    iters = math.ceil(math.ceil(n / world_size) / per_process_batch)
    return iters if max_iters is None else min(iters, max_iters)


def make_train_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                      seed: int) -> tuple[DataLoader, EpochSampler]:
    sampler = EpochSampler(len(dataset), D.get_world_size(), D.get_rank(), shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", collate_fn=collate_crops, drop_last=False,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
    return loader, sampler


# ----------------------------------------------------------------------------- sanity check
def snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def sanity_check(backbone: nn.Module, reference: Mapping[str, torch.Tensor]) -> None:
    """MoCo's ``sanity_check``: every backbone tensor (weights and BN statistics) is unchanged."""
    for k, v in backbone.state_dict().items():
        if not torch.equal(v, reference[k]):
            raise AssertionError(f"sanity check failed: backbone tensor {k} changed during linear evaluation")
    log.info("sanity check passed: the backbone is unchanged")


# ----------------------------------------------------------------------------- output / resume
def is_head_checkpoint(ckpt, kind: str = HEAD_KIND) -> bool:
    """A run checkpoint of ``kind`` (a linear head of eval_linear.py, a fine-tuned network of eval_semi.py)."""
    return isinstance(ckpt, dict) and ckpt.get("kind") == kind and "state_dict" in ckpt


def check_dump_path(dump_path: str, pretrained: str, kind: str = HEAD_KIND) -> None:
    """Refuse to write into a pretraining directory: the directory of ``--pretrained``, one holding
    ``checkpoint_NNNN.pth.tar`` files, or one whose ``checkpoint.pth.tar`` is not a run checkpoint of
    ``kind`` (LORAC's pretraining name; the official eval script would "resume" from it, spec §6)."""
    name, _, default_dir = RUN_KINDS[kind]
    dump = os.path.realpath(dump_path)
    if pretrained and dump == os.path.realpath(os.path.dirname(os.path.abspath(pretrained))):
        raise UserError(f"--dump_path {dump_path} is the directory of --pretrained: give the evaluation "
                        f"its own directory (e.g. --dump_path ./{default_dir})")
    if not os.path.isdir(dump):
        return
    rx = re.compile(r"checkpoint_\d+\.pth(\.tar)?")
    pre = sorted(f for f in os.listdir(dump) if rx.fullmatch(f))
    if pre:
        raise UserError(f"--dump_path {dump_path} holds pretraining checkpoints ({pre[0]} ...): "
                        "give the evaluation its own directory")
    ck = os.path.join(dump, "checkpoint.pth.tar")
    if os.path.isfile(ck) and not is_head_checkpoint(load_checkpoint(ck), kind):
        raise UserError(f"{ck} is not a {name} checkpoint (a pretraining checkpoint?): "
                        "give the evaluation its own --dump_path")


def head_state(head: nn.Module, optimizer, epoch: int, best_acc1: float, best_epoch: int, args: dict,
               meta: dict, next_iter: int = 0, scaler=None, kind: str = HEAD_KIND) -> dict:
    """``epoch``: the next epoch to run, or with ``next_iter`` > 0 the interrupted one (then
    ``iter``, ``world_size`` and ``batch_size`` say where to continue). ``head`` is the trained
    module: the linear head, or the whole network for ``kind`` = fine-tuning."""
    net = head.module if hasattr(head, "module") else head
    return {"kind": kind, "epoch": epoch, "iter": next_iter, "state_dict": net.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
            "world_size": D.get_world_size(), "best_acc1": best_acc1, "best_epoch": best_epoch,
            "args": args, **meta}


def load_head(path: str, head: nn.Module, optimizer=None, scaler=None, kind: str = HEAD_KIND) -> dict:
    """Restore a run checkpoint written by :func:`head_state`; returns it."""
    name, script, _ = RUN_KINDS[kind]
    ckpt = load_checkpoint(path)
    if not is_head_checkpoint(ckpt, kind):
        raise UserError(f"{path} is not a {name} checkpoint written by {script}")
    net = head.module if hasattr(head, "module") else head
    try:
        net.load_state_dict(ckpt["state_dict"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"cannot resume the {name} run from {path}: {str(e).splitlines()[0]}") from e
    return ckpt
