#!/usr/bin/env python
"""SogCLR pretraining (Optimization-AI/SogCLR ``train.py`` flags; sogclr_caco.md Part A).

    python main_sogclr.py --lr=.075 --epochs=800 --batch-size=256 --learning-rate-scaling=sqrt \
        --loss_type dcl --gamma 0.9 --multiprocessing-distributed --world-size 1 --rank 0 --workers 32 \
        --crop-min=.08 --wd=1e-6 --dist-url 'tcp://localhost:10001' --data_name imagenet1000 \
        --data /path/imagenet1000/ --save_dir /path/saved_models/ --print-freq 1000

``-b`` is the **global** batch (split over all processes); lr = ``--lr``·√B_g (sqrt) or ·B_g/256
(linear); LARS; per-iteration linear warmup from 0 then cosine to 0. Checkpoints
``checkpoint_%04d.pth.tar`` (keys ``epoch arch state_dict optimizer scaler u`` + ours) go to
``<save_dir>/<official logdir>`` (``--output_dir`` overrides) when ``epoch % 10 == 0`` (0-based) or in
the last 2 epochs; a rerun resumes from the newest one there.
"""
from __future__ import annotations

import argparse
import logging
import math
import os

import torch

from src import distributed as D
from src import sanity
from src.cli import (HelpFormatter, add_engine_args, engine_config, knn_monitor, prepare_data, print_setup, train_dir,
                     workers_per_process)
from src.data import small
from src.data.datasets import ImageDataset
from src.data.transforms import TwoCropsTransform, sogclr_augmentation
from src.engine import CheckpointPolicy, KnnMonitor, Trainer, seed_everything
from src.errors import UserError, cli_main
from src.logger import save_args, setup_logging
from src.methods.sogclr import SogCLR
from src.models.backbones import arch_spec
from src.optim import LARS, WarmupCosineLR

log = logging.getLogger("ssl")

#: ``--data_name`` → number of class folders (first N in sorted order; None: all). ImageNet-100 of
#: SogCLR ("ImageNet-S") is exactly the first 100 ImageNet-1k WNIDs in sorted order (A4).
DATA_NAMES = {"imagenet1000": None, "imagenet100": 100, "custom": None}
METHOD_NAMES = {"dcl": "sogclr", "cl": "simclr"}
INIT_SEED = 2022  # the official set_all_seeds(2022) before model construction (A2)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="SogCLR pretraining", formatter_class=HelpFormatter)
    p.add_argument("--data", metavar="DIR", default="/data/imagenet100/", help="dataset root: <--data>/train for training, <--data>/val for the kNN monitor")
    p.add_argument("-a", "--arch", default="resnet50", help="backbone architecture")
    p.add_argument("-j", "--workers", default=4, type=int, help="data loading workers per node (split over its processes)")
    p.add_argument("--epochs", default=100, type=int, help="training epochs")
    p.add_argument("--start-epoch", "--start_epoch", dest="start_epoch", default=0, type=int,
                   help="first epoch when not resuming (a resumed checkpoint overrides it)")
    p.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", default=4096, type=int,
                   help="GLOBAL batch over all processes and nodes (split over them)")
    p.add_argument("--lr", "--learning-rate", "--learning_rate", dest="lr", default=0.6, type=float,
                   help="base lr, scaled by --learning-rate-scaling on the global batch (README: 0.075 with sqrt)")
    p.add_argument("--momentum", default=0.9, type=float, help="LARS momentum")
    p.add_argument("--wd", "--weight-decay", "--weight_decay", dest="weight_decay", default=1e-6, type=float, help="weight decay")
    p.add_argument("-p", "--print-freq", "--print_freq", dest="print_freq", default=10, type=int, help="log every N iterations")
    p.add_argument("--resume", default="", type=str, help="checkpoint to resume from (empty: the newest in the run dir)")
    p.add_argument("--seed", default=None, type=int,
                   help=f"seed of model init and training randomness (None: {INIT_SEED}, as the official "
                        "set_all_seeds(2022)); also sets cudnn.deterministic")
    D.add_dist_args(p, dist_url_default="tcp://224.66.41.62:23456")
    p.add_argument("--dim", default=128, type=int, help="projector output dim")
    p.add_argument("--mlp-dim", "--mlp_dim", dest="mlp_dim", default=2048, type=int, help="projector hidden dim")
    p.add_argument("--t", default=0.1, type=float, help="temperature")
    p.add_argument("--num_proj_layers", "--num-proj-layers", dest="num_proj_layers", default=2, type=int,
                   help="projector layers (the official code ignores it and always uses 2; honoured here)")
    p.add_argument("--optimizer", default="lars", choices=["lars", "adamw"], help="optimiser of the encoder")
    p.add_argument("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", default=10, type=int,
                   help="linear lr warmup epochs (per iteration, from 0)")
    p.add_argument("--crop-min", "--crop_min", dest="crop_min", default=0.08, type=float, help="RandomResizedCrop min scale")
    p.add_argument("--data_name", "--data-name", dest="data_name", default="imagenet1000", choices=sorted(DATA_NAMES),
                   help="imagenet1000: every class of <data>/train; imagenet100: its first 100 class folders "
                        "(sorted); custom: every class")
    p.add_argument("--save_dir", "--save-dir", dest="save_dir", default="./saved_models/",
                   help="root of the run directory <save_dir>/<logdir>")
    p.add_argument("--loss_type", "--loss-type", dest="loss_type", default="dcl", choices=["dcl", "cl"],
                   help="dcl: SogCLR dynamic contrastive loss; cl: SimCLR NT-Xent")
    p.add_argument("--gamma", default=0.9, type=float, help="weight of the new estimate in the moving average u")
    p.add_argument("--learning-rate-scaling", "--learning_rate_scaling", dest="learning_rate_scaling",
                   default="sqrt", choices=["sqrt", "linear"],
                   help="how --lr is scaled: sqrt: lr x sqrt(global batch); linear: lr x global batch / 256")
    g = p.add_argument_group("this repository")
    g.add_argument("--full_grad_gather", "--full-grad-gather", dest="full_grad_gather", type=D.str2bool, nargs="?",
                   const=True, default=False,
                   help="all-reduce the gradient of the feature gather (exact gradient of the global loss); "
                        "default false = the official all_gather_layer, which keeps only the local slice")
    g.add_argument("--u_update", "--u-update", dest="u_update", default="mean", choices=["mean", "sum"],
                   help="u write-back: (u1+u2)/2 (official HEAD) or u1+u2 (the PyTorch code before commit e944141; it keeps the first-visit rule, which the TF original lacks)")
    g.add_argument("--train_list", default=None, help="file list of the training subset (lines '<relpath> [label]')")
    g.add_argument("--val_list", default=None, help="file list of the validation subset (kNN monitor)")
    add_engine_args(p, fp16_default=True, knn_root="<--data>")
    return p


def scaled_lr(args: argparse.Namespace) -> float:
    """A3: computed from the global batch before it is split per process."""
    if args.learning_rate_scaling == "sqrt":
        return args.lr * math.sqrt(args.batch_size)
    return args.lr * args.batch_size / 256


def logdir_name(args: argparse.Namespace) -> str:
    """The official run-directory name (A6), with its fixed date prefix."""
    return "20221005_%s_%s_%s-%s-%s_bz_%s_E%s_WR%s_lr_%.3f_%s_wd_%s_t_%s_g_%s_%s" % (
        args.data_name, args.arch, METHOD_NAMES[args.loss_type], args.dim, args.mlp_dim, args.batch_size,
        args.epochs, args.warmup_epochs, scaled_lr(args), args.learning_rate_scaling, args.weight_decay,
        args.t, args.gamma, args.optimizer)


def run_dir(args: argparse.Namespace) -> str:
    return args.output_dir or os.path.join(args.save_dir, logdir_name(args))


def should_save(epoch: int, epochs: int) -> bool:
    """A6: ``epoch % 10 == 0 or epochs - epoch < 3`` (0-based epoch)."""
    return epoch % 10 == 0 or epochs - epoch < 3


def build_datasets(args: argparse.Namespace, workers: int = 4) -> tuple[ImageDataset, KnnMonitor | None]:
    num_classes = DATA_NAMES[args.data_name]
    aug = TwoCropsTransform(sogclr_augmentation(args.image_size, args.crop_min,
                                                **small.aug_kwargs(args, min_scale=False)))
    if small.is_small_dataset(args):
        return small.pretraining_set(args, args.data, aug), knn_monitor(args, args.data, workers=workers)
    tdir = train_dir(args.data)
    if args.train_list:
        train_set = ImageDataset(tdir, aug, file_list=args.train_list, seed=args.data_seed)
    else:
        train_set = ImageDataset(tdir, aug, num_classes=num_classes, seed=args.data_seed)
    knn = knn_monitor(args, args.data, num_classes=num_classes, train_list=args.train_list, val_list=args.val_list,
                      workers=workers)
    return train_set, knn


def build_method(args: argparse.Namespace, info: D.DistInfo, num_samples: int):
    """(method with sync BN on the device, LARS or AdamW at the scaled lr, warmup + cosine) for a dataset
    of ``num_samples`` images; scripts/benchmark_train.py builds the method with this too."""
    method = SogCLR(args.arch, num_samples, args.dim, args.mlp_dim, args.t, args.gamma, args.loss_type,
                    full_grad=args.full_grad_gather, num_proj_layers=args.num_proj_layers, u_update=args.u_update,
                    cifar_stem=args.cifar_stem)
    if info.distributed and info.device.type == "cuda":
        from src.models.backbones import convert_sync_batchnorm  # covers timm norm-act layers
        method = convert_sync_batchnorm(method)
    elif info.distributed:
        log.warning("SyncBatchNorm needs CUDA: BN statistics are per process on this CPU run")
    method = method.to(info.device)
    lr = scaled_lr(args)
    params = method.base_encoder.parameters()
    if args.optimizer == "lars":
        optimizer = LARS(params, lr, weight_decay=args.weight_decay, momentum=args.momentum)
    else:
        optimizer = torch.optim.AdamW(params, lr, weight_decay=args.weight_decay)
    return method, optimizer, WarmupCosineLR(lr, args.epochs, args.warmup_epochs)


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    out = run_dir(args)
    setup_logging(out, info.rank)
    if args.batch_size % info.world_size:
        raise UserError(f"--batch-size {args.batch_size} (global) is not divisible by the {info.world_size} processes")
    batch = args.batch_size // info.world_size
    workers = workers_per_process(args.workers, info)
    train_set, knn = build_datasets(args, workers)
    seed_everything(args.seed if args.seed is not None else INIT_SEED)
    if args.seed is not None:
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True
    method, optimizer, schedule = build_method(args, info, len(train_set))
    lr = scaled_lr(args)
    print_setup(info, batch, f"lr {args.lr} x {args.learning_rate_scaling}(B_g={args.batch_size}) = {lr:.4f}, "
                f"{args.optimizer}, loss {args.loss_type}, gamma {args.gamma}, N={len(train_set)}",
                f"warmup {args.warmup_epochs} epochs from 0 then cosine to 0, per iteration")
    sanity.report(info, small.describe(args), sanity.amp_notice(args, info.device),
                  sanity.warmup_warning(args.warmup_epochs, args.epochs, "--warmup-epochs"),
                  sanity.lr_warning("sogclr", lr, args.batch_size,
                                    f"--lr {args.lr:g} x {args.learning_rate_scaling}(global batch {args.batch_size})"),
                  sanity.image_size_warning(train_set, args.image_size, "--image_size", "training crops"),
                  sanity.knn_image_size_warning(knn, args.image_size))
    if info.is_main:
        save_args(args, out)
    policy = CheckpointPolicy(out, filename=lambda e: f"checkpoint_{e:04d}.pth.tar", should_save=should_save)
    cfg = engine_config(args, batch_size=batch, output_dir=out, checkpoint=policy,
                        method_name=METHOD_NAMES[args.loss_type], workers=workers)
    Trainer(method, optimizer, schedule, train_set, cfg, info, knn).fit()


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    arch_spec(args.arch)          # fail fast, before any process is spawned
    prepare_data(args, args.data)
    if small.is_small_dataset(args) and (args.train_list or args.data_name == "imagenet100"):
        raise UserError(f"--train_list and --data_name imagenet100 select ImageNet folders, not "
                        f"--dataset {args.dataset}")
    if args.batch_size < 2:
        raise UserError("--batch-size must be at least 2 (the loss needs negatives)")
    os.makedirs(run_dir(args), exist_ok=True)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
