#!/usr/bin/env python
"""CaCo pretraining (maple-research-lab/CaCo ``main.py`` flags; sogclr_caco.md Part B).

    python main_caco.py --type=0 --lr=0.3 --lr_final=0.003 --memory_lr=3.0 --memory_lr_final=3.0 \
        --cluster=65536 --moco_t=0.08 --mem_t=0.08 --data=datasets/imagenet --dist_url=tcp://localhost:10001 \
        --batch_size=1024 --wd=1.5e-6 --mem_wd=0 --moco_dim=256 --moco_m=0.99 --moco_m_decay=1 --mlp_dim=2048 \
        --epochs=200 --warmup_epochs=10 --nodes_num=1 --workers=32 --world_size 1 --rank=0 --mem_momentum=0.9 \
        --ad_init=1 --knn_batch_size=1024 --multi_crop=0 --knn_freq=10

``--batch_size`` is the batch of one node (``--nodes_num`` > 1: of all nodes together, divided by
nodes_num), split over the node's processes; ``--world_size`` counts nodes. init_lr = lr·batch_size/256
with the CLI value. LARS; per-epoch warmup then cosine to init_lr·lr_final/lr; memory lr per epoch,
not scaled. Checkpoints ``checkpoint_best.pth.tar`` (every epoch: the latest) and
``checkpoint_{epoch:04d}.pth.tar`` (epoch % 10 == 9) with keys ``epoch arch best_acc knn_acc
state_dict optimizer Memory_Bank`` (+ ours) go to ``<cwd>/<log_path>/<official sub-path>``
(``--output_dir`` overrides); a rerun resumes from ``checkpoint_best.pth.tar`` there and skips ad_init (a
stop inside ad_init writes ``checkpoint_interrupted.pth.tar``, from which the rerun continues ad_init).
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

from src import distributed as D
from src import sanity
from src.cli import (HelpFormatter, add_engine_args, engine_config, knn_monitor, prepare_data, print_setup,
                     workers_per_process)
from src.data import small
from src.data.datasets import ImageDataset
from src.data.transforms import TwoCropsTransform, caco_augmentations, caco_multicrop
from src.engine import CheckpointPolicy, KnnMonitor, Trainer, seed_everything
from src.errors import UserError, cli_main
from src.logger import save_args, setup_logging
from src.methods.caco import CaCo, CaCoEpochLR, memory_lr_at_epoch, momentum_at_epoch
from src.models.backbones import arch_spec
from src.optim import LARS

log = logging.getLogger("ssl")
BEST = "checkpoint_best.pth.tar"
KNN_BANK_FRACTION = 0.2   # official pick_first (B5)
COLLAPSE_ACC, COLLAPSE_EPOCH = 1.0, 20


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CaCo pretraining", formatter_class=HelpFormatter)
    p.add_argument("--data", default="data", metavar="DIR", help="dataset root: <--data>/train for training, <--data>/val for the kNN monitor")
    p.add_argument("--log_path", default="train_log", help="root of the official run directory (under the cwd)")
    p.add_argument("-a", "--arch", default="resnet50", help="backbone architecture")
    p.add_argument("-j", "--workers", default=32, type=int, help="data loading workers per node")
    p.add_argument("--epochs", default=200, type=int, help="training epochs")
    p.add_argument("--start_epoch", "--start-epoch", dest="start_epoch", default=0, type=int,
                   help="first epoch when not resuming (a resumed checkpoint overrides it)")
    p.add_argument("-b", "--batch_size", "--batch-size", dest="batch_size", default=256, type=int,
                   help="batch PER NODE (with --nodes_num > 1: of all nodes, divided by nodes_num), "
                        "split over the node's processes; init_lr = lr x batch_size / 256")
    p.add_argument("--lr", "--learning_rate", dest="lr", default=0.03, type=float, help="base lr, scaled: init_lr = lr x batch_size/256 (README: 0.3)")
    p.add_argument("--lr_final", default=0.0003, type=float, help="final lr of the cosine (scaled like --lr)")
    p.add_argument("--momentum", default=0.9, type=float, help="LARS momentum")
    p.add_argument("--mem_momentum", default=0.9, type=float, help="momentum of the memory's SGD")
    p.add_argument("--wd", "--weight_decay", dest="weight_decay", default=1e-4, type=float, help="encoder weight decay")
    p.add_argument("--mem_wd", default=1e-4, type=float,
                   help="memory weight decay: NOT applied (as the official code) unless --apply_mem_wd")
    p.add_argument("-p", "--print_freq", "--print-freq", dest="print_freq", default=10, type=int, help="log every N iterations")
    p.add_argument("--resume", default="", type=str,
                   help="checkpoint to resume from (empty: checkpoint_best.pth.tar of the run directory)")
    p.add_argument("--seed", default=None, type=int, help="seed of init and training randomness (None: 0)")
    D.add_dist_args(p, world_size_default=1, rank_default=0, dist_url_default="tcp://224.66.41.62:23456")
    p.set_defaults(multiprocessing_distributed=True)  # official default 1: one process per GPU
    p.add_argument("--moco_dim", default=128, type=int, help="projector output = memory dimension C")
    p.add_argument("--moco_m", default=0.999, type=float, help="EMA momentum (start value with --moco_m_decay 1)")
    p.add_argument("--moco_m_decay", default=0, type=int, help="1: m rises to 1 by a per-epoch cosine")
    p.add_argument("--moco_t", default=0.12, type=float, help="temperature of the encoder's loss")
    p.add_argument("--mem_t", default=0.02, type=float, help="temperature of the memory update")
    p.add_argument("--mlp_dim", default=2048, type=int, help="projector hidden width")
    p.add_argument("--dataset", default="ImageNet",
                   help="name used in the run directory (any ImageFolder); cifar10, cifar100 or stl10 read those "
                        "datasets from <--data> with the small-image preset (docs/small_images.md)")
    p.add_argument("--cluster", default=65536, type=int, help="memory size K")
    p.add_argument("--memory_lr", default=3.0, type=float, help="memory lr (not scaled by the batch)")
    p.add_argument("--memory_lr_final", default=0.03, type=float, help="memory lr at the end (equal: constant; not scaled)")
    p.add_argument("--ad_init", default=1, type=int, help="1: fill the memory with momentum keys first (B1)")
    p.add_argument("--nodes_num", default=1, type=int, help="divides --batch_size, --knn_batch_size, --workers")
    p.add_argument("--knn_neighbor", dest="knn_k", default=20, type=int, help="k of the kNN monitor")
    p.add_argument("--type", default=0, type=int, help="tag in the run directory only")
    p.add_argument("--warmup_epochs", default=0, type=int, help="lr and memory-lr warmup epochs")
    p.add_argument("--multi_crop", "--multicrop", dest="multi_crop", default=0, type=int, help="1: multi-crop")
    p.add_argument("--nmb_crops", type=int, default=[1, 6], nargs="+", help="crops per size after crop 0")
    p.add_argument("--size_crops", type=int, default=[224, 96], nargs="+", help="crop size (px) per group")
    p.add_argument("--min_scale_crops", type=float, default=[0.14, 0.05], nargs="+",
                   help="RandomResizedCrop min scale per group")
    p.add_argument("--max_scale_crops", type=float, default=[1.0, 0.14], nargs="+",
                   help="RandomResizedCrop max scale per group")
    g = p.add_argument_group("this repository")
    g.add_argument("--apply_mem_wd", type=D.str2bool, nargs="?", const=True, default=False,
                   help="apply --mem_wd to the memory step (g + wd·W, CaCo_PN.update); the official run never does")
    g.add_argument("--knn_collapse_exit", type=D.str2bool, nargs="?", const=True, default=False,
                   help="stop the run when kNN top-1 <= 1%% at epoch >= 20 (official); default: a warning")
    g.add_argument("--knn_bank_fraction", type=float, default=KNN_BANK_FRACTION,
                   help="kNN bank: the first fraction of every training class (official 0.2)")
    add_engine_args(p, knn_root="<--data>", dataset_flag=False)
    p.set_defaults(knn_freq=1, knn_batch_size=128)
    for a in p._actions:
        if a.dest == "knn_freq":
            a.help = "kNN monitor after epoch e when e %% knn_freq == 0 or e <= 20 (0: off)"
        elif a.dest == "knn_batch_size":
            a.help = "kNN batch PER NODE (divided like --batch_size)"
    return p


def run_dir(args: argparse.Namespace) -> str:
    """The official save path (B6): <cwd>/<log_path>/<dataset>/Type_<type>/lr_<lr>_<lr_final>/... ."""
    if args.output_dir:
        return args.output_dir
    parts = [args.log_path, args.dataset, f"Type_{args.type}", f"lr_{args.lr}_{args.lr_final}",
             f"memlr_{args.memory_lr}_{args.memory_lr_final}", f"t_{args.moco_t}_memt{args.mem_t}",
             f"wd_{args.weight_decay}_memwd{args.mem_wd}",
             f"mocom{'decay' if args.moco_m_decay else ''}_{args.moco_m}", f"memgradm_{args.mem_momentum}",
             f"hidden{args.mlp_dim}_out{args.moco_dim}", f"batch_{args.batch_size}", f"epoch_{args.epochs}",
             f"warm_{args.warmup_epochs}"]
    return os.path.join(os.getcwd(), *parts)


def checkpoint_policy(out: str) -> CheckpointPolicy:
    """B6: ``checkpoint_best.pth.tar`` every epoch (the latest), copied to ``checkpoint_%04d`` when
    epoch % 10 == 9; auto-resume reads ``checkpoint_best.pth.tar``."""
    return CheckpointPolicy(out, filename=lambda e: BEST, fixed_resume_name=BEST,
                            copies=lambda e, n: [os.path.join(out, f"checkpoint_{e:04d}.pth.tar")] if e % 10 == 9 else [])


def check_args(args: argparse.Namespace) -> None:
    """One clear line for inconsistent flags, before any process is spawned."""
    if args.multi_crop:
        lens = {len(args.size_crops), len(args.nmb_crops), len(args.min_scale_crops), len(args.max_scale_crops)}
        if len(lens) != 1:
            raise UserError("--size_crops, --nmb_crops, --min_scale_crops and --max_scale_crops must have the "
                            f"same length (got {len(args.size_crops)}, {len(args.nmb_crops)}, "
                            f"{len(args.min_scale_crops)}, {len(args.max_scale_crops)})")
        if any(n < 0 for n in args.nmb_crops) or sum(args.nmb_crops) < 1:
            raise UserError("--multi_crop 1 needs at least one crop after crop 0 (--nmb_crops, e.g. 1 6)")
    for flag in ("cluster", "batch_size", "nodes_num", "epochs", "moco_dim"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.batch_size % args.nodes_num:
        raise UserError(f"--batch_size {args.batch_size} is not divisible by --nodes_num {args.nodes_num}")
    if args.knn_freq < 0 or not 0 < args.knn_bank_fraction <= 1:
        raise UserError("--knn_freq must be >= 0 and --knn_bank_fraction in (0, 1]")


def per_process(total: int, args: argparse.Namespace, info: D.DistInfo, what: str) -> int:
    """Official division (B5): by nodes_num, then by the node's processes."""
    n = info.local_world_size if info.distributed else 1
    per_node = total // args.nodes_num
    if per_node % n:
        raise UserError(f"{what} {per_node} per node is not divisible by the {n} processes of this node")
    return per_node // n


def build_train_set(args: argparse.Namespace) -> ImageDataset:
    kw = small.aug_kwargs(args)
    if args.multi_crop:
        if "min_scale" in kw:   # the small-image preset's scale applies to crop 0 (the global crop)
            kw["init_min_scale"] = kw.pop("min_scale")
        aug = caco_multicrop(args.size_crops, args.nmb_crops, args.min_scale_crops, args.max_scale_crops,
                             init_size=args.image_size, **kw)
    else:
        aug = TwoCropsTransform(*caco_augmentations(args.image_size, **kw))
    return small.pretraining_set(args, args.data, aug)


def collapse_guard(method: CaCo, out: str, info: D.DistInfo, stop: bool):
    """B5: append to ``knn.log``; top-1 <= 1 % at epoch >= 20 warns, or stops the run with ``stop``."""
    def check(epoch: int, top1: float) -> None:
        method.knn_acc = top1
        if info.is_main:
            with open(os.path.join(out, "knn.log"), "a") as f:
                f.write("%d epoch KNN monitor Accuracy %f\n" % (epoch, top1))
        if top1 <= COLLAPSE_ACC and epoch >= COLLAPSE_EPOCH:
            msg = f"kNN top-1 {top1:.2f}% at epoch {epoch}: the representation may have collapsed"
            if stop:
                raise UserError(msg + " (--knn_collapse_exit)")
            log.warning("%s", msg)
    return check


def build_knn(args: argparse.Namespace, data: str, method: CaCo, out: str, workers: int, batch_size: int,
              info: D.DistInfo) -> KnnMonitor | None:
    """B5: bank = the first ``--knn_bank_fraction`` (0.2) of every train class, queries = <data>/val,
    after epoch e when ``e % knn_freq == 0 or e <= 20``; the collapse guard as the check."""
    if not args.knn_freq:
        return None
    return knn_monitor(args, data, workers=workers, pick_first=args.knn_bank_fraction, batch_size=batch_size,
                       schedule=lambda e: e % args.knn_freq == 0 or e <= COLLAPSE_EPOCH,
                       check=collapse_guard(method, out, info, args.knn_collapse_exit))


def initial_lr(args: argparse.Namespace) -> float:
    """B3: init_lr = lr x batch_size / 256 with the command-line batch (per node)."""
    return args.lr * args.batch_size / 256


def build_method(args: argparse.Namespace, info: D.DistInfo):
    """(method with sync BN on the device, LARS at init_lr, per-epoch schedule); scripts/benchmark_train.py
    builds the method with this too."""
    init_lr = initial_lr(args)
    method = CaCo(args.arch, args.moco_dim, args.mlp_dim, args.cluster, args.moco_t, args.mem_t, args.moco_m,
                  bool(args.moco_m_decay), args.mem_momentum, args.memory_lr, args.memory_lr_final, args.epochs,
                  args.warmup_epochs, bool(args.multi_crop), bool(args.ad_init), init_lr, cifar_stem=args.cifar_stem,
                  mem_wd=args.mem_wd if args.apply_mem_wd else 0.0)
    if args.mem_wd and not args.apply_mem_wd:
        log.info("--mem_wd %g is not applied (as in the official code); --apply_mem_wd applies it", args.mem_wd)
    if info.distributed and info.device.type == "cuda":
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    elif info.distributed:
        log.warning("SyncBatchNorm needs CUDA: BN statistics are per process on this CPU run")
    method = method.to(info.device)
    # over both encoders, as the official LARS(model.parameters()): encoder_k (no grad) is skipped, and
    # the optimiser state of an official checkpoint loads unchanged
    optimizer = LARS(list(method.encoder_q.parameters()) + list(method.encoder_k.parameters()), init_lr,
                     weight_decay=args.weight_decay, momentum=args.momentum)
    return method, optimizer, CaCoEpochLR(init_lr, args.lr, args.lr_final, args.epochs, args.warmup_epochs)


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    out = run_dir(args)
    setup_logging(out, info.rank)
    seed_everything(args.seed if args.seed is not None else 0)
    batch = per_process(args.batch_size, args, info, "--batch_size")
    workers = workers_per_process(max(args.workers // args.nodes_num, 0), info)
    global_batch = batch * info.world_size
    train_set = build_train_set(args)
    if args.ad_init and args.cluster > (len(train_set) // global_batch) * global_batch:
        raise UserError(f"--ad_init 1 fills the --cluster {args.cluster} memory columns with one epoch of "
                        f"momentum keys, but an epoch has only {(len(train_set) // global_batch) * global_batch} "
                        f"images at global batch {global_batch}: lower --cluster or use --ad_init 0")
    method, optimizer, schedule = build_method(args, info)
    init_lr = initial_lr(args)
    print_setup(info, batch, f"batch_size {args.batch_size} per node / nodes_num {args.nodes_num} -> effective global "
                f"batch {global_batch}; init_lr {args.lr} x {args.batch_size}/256 = {init_lr:.4g}, LARS, memory "
                f"K={args.cluster} lr {args.memory_lr}->{args.memory_lr_final}, m {args.moco_m}"
                f"{' (cosine to 1)' if args.moco_m_decay else ''}, {'multi-crop' if args.multi_crop else 'single crop'}"
                f", ad_init {args.ad_init}",
                f"per epoch: warmup {args.warmup_epochs} then cosine to {init_lr * args.lr_final / args.lr:.4g}; "
                f"memory lr epoch 0 {memory_lr_at_epoch(0, args.memory_lr, args.memory_lr_final, args.epochs, args.warmup_epochs):.4g}"
                f", m epoch 0 {momentum_at_epoch(0, args.moco_m, args.epochs, bool(args.moco_m_decay)):.4g}")
    if info.is_main:
        save_args(args, out)
    knn = build_knn(args, args.data, method, out, workers,
                    per_process(args.knn_batch_size, args, info, "--knn_batch_size"), info)
    crop = max(args.size_crops + [args.image_size]) if args.multi_crop else args.image_size
    sanity.report(info, small.describe(args), sanity.amp_notice(args, info.device),
                  sanity.warmup_warning(args.warmup_epochs, args.epochs),
                  sanity.lr_warning("caco", init_lr, args.batch_size, f"--lr {args.lr:g} x {args.batch_size}/256"),
                  sanity.image_size_warning(train_set, crop, "--image_size" if crop == args.image_size else
                                            "--size_crops", "training crops"),
                  sanity.knn_image_size_warning(knn, args.image_size))
    cfg = engine_config(args, batch_size=batch, output_dir=out, checkpoint=checkpoint_policy(out),
                        method_name="caco", workers=workers)
    Trainer(method, optimizer, schedule, train_set, cfg, info, knn).fit()


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    arch_spec(args.arch)          # fail fast, before any process is spawned
    prepare_data(args, args.data)
    check_args(args)
    os.makedirs(run_dir(args), exist_ok=True)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
