#!/usr/bin/env python
"""Speed of a full training step of every method, and the share of it spent outside the backbone.

    python scripts/benchmark_train.py                      # GPU: ResNet-50, 224 px, batch 64, fp16, channels_last
    python scripts/benchmark_train.py --compile            #      the same with torch.compile
    python scripts/benchmark_train.py --device cpu         # CPU: ResNet-18, 64 px, batch 32, fp32
    python scripts/benchmark_train.py --methods moco swav --csv speed.csv

Each method is built by its own script's builder (``main_*.py: build_method`` / SwAV's
``place_and_optimize``) from the official seed command's flags (queue, memory, prototypes and crop
sets as published; multi-crop small crops scaled as 96/224 of ``--image_size``), and stepped exactly
as the Trainer does: ``TrainStep(lambda: method(crops, index))`` (lr, autocast, scaled backward,
``before_optimizer_step``, optimiser step) then ``after_step``, in the steady state of the last
epoch (``on_epoch_start(epochs - 1)``: LORAC's prior on, SwAV's queue full, PCL's prototypes in
use). Inputs are synthetic tensors already on the device, so the data path is not measured.

**backbone ms** is the same ``TrainStep`` (same optimiser, AMP and crops) on the backbone passes alone:
the pooled backbone forward + backward of every crop the method sends through its trained encoder,
and the no-grad forward of its key encoder or teacher (counted as backbone). **outside** =
1 − backbone / step: heads, losses, queues, EMA, shuffle-BN, gathers, u / memory updates, Sinkhorn,
SVDs. Both are medians of ``--iters`` timed iterations after ``--warmup``, interleaved (method,
backbone, method, ...), with ``torch.cuda.synchronize`` around each on GPU. **images/s** counts
samples (each with all its crops) per second of one process. **peak memory**: CUDA
``max_memory_allocated`` over two extra steps; on the CPU the peak RSS sampled from
``/proc/self/statm`` every millisecond over two extra steps, minus the RSS before the method was
built (after ``malloc_trim``): weights, optimiser state, method buffers and activations. PCL's
per-epoch E-step is not in the step: its k-means is timed on synthetic features and extrapolated
to ImageNet (see :func:`estep_share`).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src import distributed as D  # noqa: E402
from src.cli import HelpFormatter  # noqa: E402
from src.engine import TrainStep  # noqa: E402
from src.errors import UserError, cli_main  # noqa: E402
from src.methods.base import Headless  # noqa: E402
from src.methods.mocom import resolution_groups  # noqa: E402
from src.timing import peak_memory, release_freed_memory, rss_bytes, timed  # noqa: E402

METHODS = {"moco": "MoCo v2", "mocom": "MoCo-M", "lorac": "LORAC", "sogclr": "SogCLR", "caco": "CaCo",
           "disco": "DisCo", "swav": "SwAV", "pcl": "PCL v2"}
SCRIPTS = {"moco": "main_moco", "mocom": "main_moco_m", "lorac": "main_lorac", "sogclr": "main_sogclr",
           "caco": "main_caco", "disco": "main_disco", "swav": "main_swav", "pcl": "main_pcl"}
IMAGENET = 1281167                    # training images of ImageNet-1k: the size of SogCLR's u and PCL's im2cluster
PCL_CLUSTERS = (25000, 50000, 100000)  # the official --num-cluster
OVERHEAD_TARGET, ESTEP_TARGET = 0.10, 0.05
COLUMNS = ["method", "crops", "batch", "images_per_s", "ms_per_step", "backbone_ms", "outside_backbone",
           "peak_memory_mb", "target"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training-step speed of every method (synthetic inputs on the device)",
                                formatter_class=HelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    p.add_argument("-a", "--arch", default=None, help="backbone (None: resnet50 on GPU, resnet18 on CPU)")
    p.add_argument("--image_size", type=int, default=None, help="large-crop size (None: 224 on GPU, 64 on CPU)")
    p.add_argument("-b", "--batch_size", type=int, default=None, help="samples per step (None: 64 on GPU, 32 on CPU)")
    p.add_argument("--amp", choices=["fp16", "bf16", "none"], default=None, help="autocast (None: fp16 on GPU)")
    p.add_argument("--channels_last", type=D.str2bool, default=None, help="(None: true on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the method and the backbone passes")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (None: 5 on GPU, 2 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (None: 20 on GPU, 5 on CPU)")
    p.add_argument("--kmeans_images", type=int, default=10000, help="PCL: synthetic features clustered")
    p.add_argument("--kmeans_clusters", default="100,200,400",
                   help="PCL: clusters of the timed k-means (same 1:2:4 ratio as the official 25000,50000,100000)")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    return p


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Device defaults and one-line errors."""
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    gpu = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    a.device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    for k, on_gpu, on_cpu in (("arch", "resnet50", "resnet18"), ("image_size", 224, 64), ("batch_size", 64, 32),
                              ("amp", "fp16", "none"), ("channels_last", True, False), ("warmup", 5, 2),
                              ("iters", 20, 5)):
        if getattr(a, k) is None:
            setattr(a, k, on_gpu if gpu else on_cpu)
    a.amp = None if a.amp == "none" else a.amp
    if a.batch_size < 2 or a.image_size < 16 or a.iters < 1 or a.warmup < 0:
        raise UserError("--batch_size >= 2, --image_size >= 16, --iters >= 1 and --warmup >= 0 are needed")
    try:
        a.kmeans_k = [int(k) for k in a.kmeans_clusters.split(",")]
    except ValueError:
        raise UserError(f"--kmeans_clusters must be comma-separated integers, got {a.kmeans_clusters!r}") from None
    if min(a.kmeans_k) < 2 or a.kmeans_images < max(a.kmeans_k):
        raise UserError("--kmeans_clusters must be >= 2 and at most --kmeans_images")
    return a


# ----------------------------------------------------------------------------- building (the scripts' own code)
def small_crop(size: int) -> int:
    """The official 96 px small crops at 224 px, scaled with the large crop (multiple of 4)."""
    return max(8, 4 * round(96 * size / 224 / 4))


def seed_argv(name: str, arch: str, batch: int, size: int) -> list[str]:
    """The official seed command of each method (README / script docstrings), at this arch, batch and size."""
    b, mc = str(batch), ["--size_crops", str(size), str(small_crop(size)), "--min_scale_crops", "0.14", "0.05",
                         "--max_scale_crops", "1.", "0.14", "--crops_for_assign", "0", "1"]
    mocom = ["--arch", arch, "--batch_size", b, "--nmb_crops", "3", "5", *mc, "--moco-dim", "128", "--moco-k", "65536",
             "--moco-m", "0.999", "--temperature", "0.2", "--mlp", "true", "--epochs", "200", "--base_lr", "1.8",
             "--final_lr", "0.018", "--wd", "1e-6", "--warmup_epochs", "0", "--sync_bn", "pytorch"]
    return {
        "moco": ["-a", arch, "--lr", "0.03", "-b", b, "--mlp", "--moco-t", "0.2", "--aug-plus", "--cos", "DIR"],
        "mocom": mocom,
        "lorac": mocom + ["--lorac_beta", "15.", "--epoch_lorac_starts", "100"],
        "sogclr": ["-a", arch, "--lr", ".075", "--epochs", "800", "-b", b, "--learning-rate-scaling", "sqrt",
                   "--loss_type", "dcl", "--gamma", "0.9", "--crop-min", ".08", "--wd", "1e-6"],
        "caco": ["-a", arch, "--lr", "0.3", "--lr_final", "0.003", "--memory_lr", "3.0", "--memory_lr_final", "3.0",
                 "--cluster", "65536", "--moco_t", "0.08", "--mem_t", "0.08", "--batch_size", b, "--wd", "1.5e-6",
                 "--mem_wd", "0", "--moco_dim", "256", "--moco_m", "0.99", "--moco_m_decay", "1", "--mlp_dim", "2048",
                 "--epochs", "200", "--warmup_epochs", "10", "--mem_momentum", "0.9", "--ad_init", "1",
                 "--multi_crop", "0"],
        "disco": ["-a", arch, "--lr", "0.03", "-b", b, "--moco-t", "0.2", "--aug-plus", "--mlp", "--cos",
                  "--teacher_arch", arch, "--teacher", "random", "DIR"],
        "swav": ["--arch", arch, "--batch_size", b, "--base_lr", "0.6", "--final_lr", "0.0006", "--warmup_epochs", "0",
                 "--nmb_crops", "2", "6", *mc, "--freeze_prototypes_niters", "5005", "--queue_length", "3840",
                 "--epoch_queue_starts", "15", "--sync_bn", "pytorch", "--temperature", "0.1", "--epsilon", "0.05",
                 "--sinkhorn_iterations", "3", "--feat_dim", "128", "--nmb_prototypes", "3000", "--epochs", "200",
                 "--wd", "0.000001"],
        "pcl": ["-a", arch, "--lr", "0.03", "-b", b, "--temperature", "0.2", "--mlp", "--aug-plus", "--cos", "DIR"],
    }[name]


def build(name: str, a: argparse.Namespace, info: D.DistInfo):
    """(script args, method on the device, optimiser, lr schedule) through the script's own builder."""
    mod = importlib.import_module(SCRIPTS[name])
    args = mod.get_parser().parse_args(seed_argv(name, a.arch, a.batch_size, a.image_size))
    if name == "disco":  # a random frozen teacher with the official MoCo v2 head (load_teacher reads it from a file)
        from src.models.backbones import feat_dim
        from src.models.heads import moco_head
        from src.models.teacher import build_teacher
        teacher = build_teacher(args.teacher_arch, moco_head(feat_dim(args.teacher_arch), args.moco_dim, True, -1))
        return (args, *mod.build_method(args, info, a.batch_size, teacher, {"arch": args.teacher_arch}))
    if name == "swav":
        from src.methods.swav import SwAV
        method = SwAV(args.arch, args.nmb_crops, **mod.swav_kwargs(args, info.world_size))
        return (args, *mod.place_and_optimize(method, args, info)[:3])
    if name == "moco":
        return (args, *mod.build_method(args, info, a.batch_size))
    if name in ("sogclr", "pcl"):
        extra = (a.batch_size,) if name == "pcl" else ()
        return (args, *mod.build_method(args, info, *extra, IMAGENET))
    return (args, *mod.build_method(args, info))


def steady_state(name: str, method, args: argparse.Namespace, epoch: int) -> None:
    """The last epoch's state, as a checkpoint resumed mid-epoch restores it: SwAV's queue full of unit
    embeddings, PCL's clusterings (random unit centroids, φ = τ, every image assigned) from this epoch."""
    extra: dict[str, torch.Tensor] = {}
    if name == "swav":
        extra["queue"] = F.normalize(torch.randn_like(method.queue), dim=-1)
    if name == "pcl":
        g = torch.Generator().manual_seed(0)
        for i, k in enumerate(method.num_cluster):
            extra[f"im2cluster_{i}"] = torch.randint(k, (IMAGENET,), generator=g)
            extra[f"centroids_{i}"] = F.normalize(torch.randn(k, method.queue.shape[0], generator=g), dim=1)
            extra[f"density_{i}"] = torch.full((k,), method.T)
            extra[f"num_ids_{i}"] = torch.tensor(k)
        extra["cluster_epoch"] = torch.tensor(epoch)
    if extra:
        sd = method.state_dict()
        sd.update({k: v.to(sd[k].device, sd[k].dtype) for k, v in extra.items()})
        method.load_state_dict(sd)
    method.on_epoch_start(epoch, SimpleNamespace(resumed_mid_epoch=True, should_stop=lambda: False))
    method.train()


def make_crops(name: str, args: argparse.Namespace, a: argparse.Namespace) -> list[torch.Tensor]:
    if name in ("mocom", "lorac", "swav"):
        sizes = [s for n, s in zip(args.nmb_crops, args.size_crops) for _ in range(n)]
    else:
        sizes = [a.image_size] * 2
    mf = torch.channels_last if a.channels_last else torch.contiguous_format
    return [torch.randn(a.batch_size, 3, s, s, device=a.device).contiguous(memory_format=mf) for s in sizes]


def backbone_passes(name: str, method, crops: list[torch.Tensor]) -> Callable[[], dict]:
    """The loss of the backbone passes alone: the pooled features of every crop through the trained
    encoder (grouped as the method groups them), plus the no-grad key-encoder / teacher forwards."""
    B = crops[0].shape[0]
    groups = [torch.cat(crops[s:e]) for s, e in resolution_groups(crops)]
    trained = {"mocom": groups, "lorac": groups, "swav": groups, "moco": crops[:1], "pcl": crops[:1]}.get(name, crops)
    keys = {"moco": crops[1:2], "pcl": crops[1:2], "disco": crops[1:2], "caco": crops[:2],
            "mocom": [groups[0][:2 * B]], "lorac": [groups[0][:2 * B]]}.get(name, [])
    net = method.backbone()
    key_net = Headless(method.encoder_k, method.arch) if keys else None
    teacher = Headless(method.teacher, method.teacher_arch) if name == "disco" else None

    def loss() -> dict:
        with torch.no_grad():
            for x in keys:
                key_net(x)
            if teacher is not None:
                teacher(crops[1])
                teacher(crops[0])
        return {"loss": sum(net(x).float().mean() for x in trained)}
    return loss


# ----------------------------------------------------------------------------- timing
@dataclass
class Result:
    name: str
    crops: str
    batch: int
    step_s: float
    backbone_s: float
    peak_mb: float

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def outside(self) -> float:
        return 1.0 - self.backbone_s / self.step_s


def crops_label(crops: list[torch.Tensor]) -> str:
    return "+".join(f"{e - s}x{crops[s].shape[-1]}" for s, e in resolution_groups(crops))


def bench_method(name: str, a: argparse.Namespace, info: D.DistInfo) -> tuple[Result, object, list[torch.Tensor]]:
    release_freed_memory(a.device)
    rss_before = rss_bytes() if a.device.type == "cpu" else 0
    args, method, optimizer, schedule = build(name, a, info)
    if a.channels_last:
        method.to(memory_format=torch.channels_last)  # as the Trainer does with --channels_last
    epoch = args.epochs - 1
    steady_state(name, method, args, epoch)
    crops = make_crops(name, args, a)
    model = torch.compile(method) if a.compile else method
    base = backbone_passes(name, method, crops)
    base = torch.compile(base) if a.compile else base
    step = TrainStep(optimizer, a.device, a.amp, before_step=method.before_optimizer_step)
    base_step = TrainStep(optimizer, a.device, a.amp)
    epoch_len = IMAGENET // a.batch_size
    # dataset indices of consecutive batches, drawn before timing (the loader hands them over for free)
    indices = torch.randperm(IMAGENET, device=a.device)[:(a.warmup + a.iters + 2) * a.batch_size].view(-1, a.batch_size)
    it = [0]

    def method_step() -> None:
        index = indices[it[0]]
        lr = schedule(epoch, it[0], epoch_len)
        _, info_ = step(lambda: model(crops, index), lr, epoch, it[0], epoch * epoch_len + it[0])
        method.after_step(info_)
        it[0] += 1

    def backbone_step() -> None:
        base_step(base, schedule(epoch, it[0], epoch_len), epoch, it[0], epoch * epoch_len + it[0])

    for _ in range(a.warmup):
        method_step(), backbone_step()
    t_step, t_base = [], []
    for _ in range(a.iters):
        t_step.append(timed(method_step, a.device))
        t_base.append(timed(backbone_step, a.device))
    mem = peak_memory(method_step, a.device, rss_before)
    res = Result(METHODS[name], crops_label(crops), a.batch_size, statistics.median(t_step),
                 statistics.median(t_base), mem)
    return res, method, crops


# ----------------------------------------------------------------------------- PCL's E-step
def estep_share(seconds: float, n_images: int, clusters: list[int], target_clusters: tuple[int, ...],
                images_per_s: float) -> tuple[float, float, float]:
    """k-means with a flat (exact) index costs ∝ N·K per iteration (niter·nredo fixed), so
    t(N, ΣK) = c·N·ΣK with c = seconds / (n_images·Σclusters) measured. Per training image at any N:
    c·ΣK_target seconds; share of an epoch = c·ΣK_target × images_per_s. Returns (c, s/image, share)."""
    c = seconds / (n_images * sum(clusters))
    per_image = c * sum(target_clusters)
    return c, per_image, per_image * images_per_s


def pcl_estep(method, crops: list[torch.Tensor], a: argparse.Namespace, images_per_s: float) -> list[str]:
    """Time the E-step's k-means (the method's own faiss code) on synthetic unit features, and its
    feature pass (key encoder, eval mode, fp32, as ``PCL.compute_features``), per image."""
    import faiss

    from src.methods.pcl_cluster import NITER, NREDO, cluster_all
    cuda = a.device.type == "cuda"
    x = np.random.default_rng(0).standard_normal((a.kmeans_images, method.queue.shape[0])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    cluster_all(x, a.kmeans_k, method.T, gpu=a.device.index if cuda else None)
    seconds = time.perf_counter() - t0
    c, per_image, share = estep_share(seconds, a.kmeans_images, a.kmeans_k, PCL_CLUSTERS, images_per_s)
    net = method.encoder_k.eval()
    with torch.no_grad():
        t_feat = statistics.median(timed(lambda: net(crops[0]), a.device) for _ in range(3)) / a.batch_size
    method.train()
    where = "GPU" if cuda and hasattr(faiss, "GpuIndexFlatL2") and faiss.get_num_gpus() > 0 else "CPU"
    verdict = "n/a (CPU)" if not cuda else ("PASS" if share < ESTEP_TARGET else "FAIL")
    ks = "+".join(map(str, PCL_CLUSTERS))
    km = (f"  k-means (faiss on {where}, niter {NITER} x nredo {NREDO}): t(N, K) = c*N*K, c = {seconds:.2f} s / "
          f"({a.kmeans_images:,} images x {sum(a.kmeans_k):,} clusters) = {c:.3e} s")
    per = (f"  per training image c*{sum(PCL_CLUSTERS):,} = {per_image * 1e3:.2f} ms; share of an epoch = "
           f"c*K x {images_per_s:.1f} images/s = {share:.1%} (target < {ESTEP_TARGET:.0%}: {verdict})")
    feat = (f"  feature pass (key encoder, eval, fp32): {t_feat * 1e3:.3f} ms/image = {t_feat * images_per_s:.1%} "
            "of an epoch (not in the target)")
    return [f"PCL E-step at ImageNet scale (N = {IMAGENET:,}, K = {ks} = {sum(PCL_CLUSTERS):,}), one process:",
            km, per, feat,
            "  with W training processes the epoch is W times shorter while k-means runs on rank 0: shares x W"]


# ----------------------------------------------------------------------------- report
def rows(results: list[Result], cuda: bool) -> list[dict]:
    out = []
    for r in results:
        target = "n/a (CPU)" if not cuda else ("PASS" if r.outside < OVERHEAD_TARGET else "FAIL")
        out.append({"method": r.name, "crops": r.crops, "batch": r.batch, "images_per_s": f"{r.images_per_s:.1f}",
                    "ms_per_step": f"{r.step_s * 1e3:.1f}", "backbone_ms": f"{r.backbone_s * 1e3:.1f}",
                    "outside_backbone": f"{r.outside:.1%}", "peak_memory_mb": f"{r.peak_mb:.0f}", "target": target})
    return out


def markdown(table: list[dict]) -> str:
    head = ["method", "crops", "batch", "images/s", "ms/step", "backbone ms", "outside backbone", "peak memory MB",
            f"outside < {OVERHEAD_TARGET:.0%}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in table]
    return "\n".join(lines)


def run(argv=None) -> list[dict]:
    a = resolve(get_parser().parse_args(argv))
    logging.basicConfig(level=logging.WARNING)
    cuda = a.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    info = D.DistInfo(device=a.device)
    name = torch.cuda.get_device_name(a.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} | torch {torch.__version__} | {a.arch} at {a.image_size} px, batch {a.batch_size} | "
          f"amp {a.amp or 'off (fp32)'} | channels_last {a.channels_last} | compile {a.compile} | median of "
          f"{a.iters} after {a.warmup} warm-up | memory: "
          f"{'CUDA max_memory_allocated' if cuda else 'peak RSS minus RSS before the build'}", flush=True)
    results, notes = [], []
    for m in a.methods:
        res, method, crops = bench_method(m, a, info)
        results.append(res)
        print(f"  {res.name}: {res.images_per_s:.1f} images/s, outside the backbone {res.outside:.1%}", flush=True)
        if m == "pcl":
            notes = pcl_estep(method, crops, a, res.images_per_s)
        del method, crops
    table = rows(results, cuda)
    print(markdown(table))
    print("\n".join(notes))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(table)
    return table


@cli_main
def main(argv=None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
