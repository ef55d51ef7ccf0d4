#!/usr/bin/env python
"""SwAV pretraining (facebookresearch/swav ``main_swav.py`` flags; spec swav.md).

    python -m torch.distributed.launch --nproc_per_node=8 main_swav.py --data_path /imagenet/train \
        --base_lr 0.6 --final_lr 0.0006 --warmup_epochs 0 --crops_for_assign 0 1 --size_crops 224 96 \
        --nmb_crops 2 6 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14 --use_fp16 true \
        --freeze_prototypes_niters 5005 --queue_length 3840 --epoch_queue_starts 15 --dump_path ./ckpt \
        --sync_bn pytorch --temperature 0.1 --epsilon 0.05 --sinkhorn_iterations 3 --feat_dim 128 \
        --nmb_prototypes 3000 --epochs 200 --batch_size 64 --wd 0.000001 --arch efficientb0

The flags are the official ones with their defaults and meanings (``--batch_size`` per process, the
lr not scaled, ``--data_path`` the train folder itself, ``--queue_length`` global and trimmed to a
multiple of the global batch). Outputs under ``--dump_path``: ``checkpoint.pth.tar`` every epoch
(auto-resumed; it holds every rank's queue), ``checkpoints/ckp-{epoch}.pth`` when ``epoch %
checkpoint_freq == 0`` (0-based, as SwAV) and at the last epoch, ``args.json``, ``log.jsonl``, ``tb/``.
``main_swav_distill.py`` is this script plus a frozen teacher (its ``main_worker`` calls :func:`fit`).
Differences from the official code: docs/swav.md.
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

from src import distributed as D
from src import sanity
from src.cli import (
    HelpFormatter,
    add_engine_args,
    engine_config,
    knn_monitor,
    prepare_data,
    print_setup,
)
from src.data import small
from src.data.transforms import SWAV_STD
from src.engine import Trainer, seed_everything
from src.errors import UserError, cli_main
from src.logger import save_args, setup_logging
from src.methods.swav import SwAV, check_crops_for_assign, trimmed_queue_length
from src.models.backbones import arch_spec
from src.multicrop import (
    add_larc_args,
    add_multicrop_data_args,
    add_run_args,
    knn_root,
    larc_with_cosine,
    multicrop_dataset,
    resolve_data_path,
    swav_checkpoint_policy,
)

log = logging.getLogger("ssl")


def get_parser(description: str = "SwAV pretraining (multi-crop, Sinkhorn-Knopp codes, LARC, per-iteration "
                                  "cosine)") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_multicrop_data_args(p)
    g = p.add_argument_group("SwAV")
    g.add_argument("--crops_for_assign", type=int, nargs="+", default=[0, 1], help="crops whose codes are targets")
    g.add_argument("--temperature", default=0.1, type=float, help="softmax temperature of the predictions")
    g.add_argument("--epsilon", default=0.05, type=float, help="Sinkhorn-Knopp regularisation ε")
    g.add_argument("--sinkhorn_iterations", default=3, type=int, help="Sinkhorn-Knopp iterations")
    g.add_argument("--feat_dim", default=128, type=int, help="embedding dimension")
    g.add_argument("--nmb_prototypes", default=3000, type=int, help="number of prototypes K")
    g.add_argument("--queue_length", type=int, default=0,
                   help="global queue length, trimmed to a multiple of batch_size x processes (0: no queue)")
    g.add_argument("--epoch_queue_starts", type=int, default=15, help="0-based epoch at which the queue starts")
    g.add_argument("--freeze_prototypes_niters", default=313, type=int,
                   help="global iterations (epoch x iterations per epoch + it) with the prototypes frozen")
    g.add_argument("--hidden_mlp", default=2048, type=int, help="hidden width of the projection head (0: linear head)")
    add_larc_args(p)
    D.add_dist_args(p)
    add_run_args(p, checkpoint_freq=25, print_freq=50, zero_based_copies=True,
                 arch_help="any registered backbone (resnet50, efficientb0, ...)",
                 sync_bn_help="pytorch | apex: SyncBatchNorm for the whole model (GPU only); anything else: none")
    add_engine_args(p, output_default="--dump_path", fp16_default=True, knn_root="<--data_path>/..")
    return p


def check_args(args: argparse.Namespace) -> None:
    n = len(args.size_crops)
    if not (len(args.nmb_crops) == len(args.min_scale_crops) == len(args.max_scale_crops) == n):
        raise UserError("--size_crops, --nmb_crops, --min_scale_crops and --max_scale_crops must have the same length")
    check_crops_for_assign(args.crops_for_assign, sum(args.nmb_crops))
    for flag in ("feat_dim", "nmb_prototypes", "batch_size", "checkpoint_freq"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1")
    if args.hidden_mlp < 0 or args.queue_length < 0 or args.sinkhorn_iterations < 0:
        raise UserError("--hidden_mlp, --queue_length and --sinkhorn_iterations must be >= 0")
    if args.epsilon <= 0 or args.temperature <= 0:
        raise UserError("--epsilon and --temperature must be positive")
    arch_spec(args.arch)
    prepare_data(args, resolve_data_path(args.data_path, quiet=True, dataset=small.dataset_name(args)), sub=None)


def swav_kwargs(args: argparse.Namespace, world_size: int) -> dict:
    """The :class:`SwAV` arguments from the flags; the queue trimmed to a multiple of the global batch."""
    queue_length = trimmed_queue_length(args.queue_length, args.batch_size, world_size)
    if args.queue_length and not queue_length:
        raise UserError(f"--queue_length {args.queue_length} is shorter than the global batch "
                        f"{args.batch_size * world_size}: no queue would be built; raise it or pass 0")
    if queue_length != args.queue_length:
        log.warning("--queue_length %d trimmed to %d, a multiple of the global batch %d (official behaviour)",
                    args.queue_length, queue_length, args.batch_size * world_size)
    return dict(crops_for_assign=args.crops_for_assign, hidden_mlp=args.hidden_mlp, feat_dim=args.feat_dim,
                nmb_prototypes=args.nmb_prototypes, temperature=args.temperature, epsilon=args.epsilon,
                sinkhorn_iterations=args.sinkhorn_iterations, queue_length=queue_length,
                epoch_queue_starts=args.epoch_queue_starts, freeze_prototypes_niters=args.freeze_prototypes_niters,
                world_size=world_size, cifar_stem=args.cifar_stem)


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    out = setup(info, args)
    method = SwAV(args.arch, args.nmb_crops, **swav_kwargs(args, info.world_size))
    fit(info, args, out, method, "swav")


def setup(info: D.DistInfo, args: argparse.Namespace) -> str:
    out = args.output_dir or args.dump_path
    os.makedirs(out, exist_ok=True)
    setup_logging(out, info.rank)
    seed_everything(args.seed)
    return out


def place_and_optimize(method: SwAV, args: argparse.Namespace, info: D.DistInfo):
    """(method with sync BN on the device, LARC, per-iteration cosine, the sync-BN description);
    scripts/benchmark_train.py prepares the method with this too."""
    sync = method.convert_sync_bn(args.sync_bn, args.syncbn_process_group_size, info.device)
    method = method.to(info.device)
    # S L171-177: LARC over SGD(model.parameters()), one group, prototypes and BN included (a teacher excluded)
    optimizer, schedule = larc_with_cosine(method.trainable_parameters(), args)
    return method, optimizer, schedule, sync


def fit(info: D.DistInfo, args: argparse.Namespace, out: str, method: SwAV, name: str, described: str = "") -> None:
    """Data, sync BN, LARC + cosine, checkpoints, kNN monitor and the Trainer: the same for SwAV and DisCo+SwAV."""
    data_path = resolve_data_path(args.data_path, dataset=small.dataset_name(args))
    train_set = multicrop_dataset(args, data_path)
    if info.is_main:
        log.info("Building data done with %d images loaded.", len(train_set))
    method, optimizer, schedule, sync = place_and_optimize(method, args, info)
    print_setup(info, args.batch_size, f"base_lr {args.base_lr} -> final_lr {args.final_lr} (LARC trust 0.001, not scaled)",
                f"cosine per iteration, {args.warmup_epochs} warmup epochs from {args.start_warmup}")
    q = method.queue_length
    log.info("crops %s at %s px, assign %s | %d prototypes x %d, tau %g, eps %g, %d SK iterations | queue %d global "
             "(%d per process) from epoch %d | prototypes frozen for %d iterations | sync BN: %s%s",
             args.nmb_crops, args.size_crops, args.crops_for_assign, args.nmb_prototypes, args.feat_dim,
             args.temperature, args.epsilon, args.sinkhorn_iterations, q, q // info.world_size,
             args.epoch_queue_starts, args.freeze_prototypes_niters, sync, described)
    knn = knn_monitor(args, knn_root(data_path, small.dataset_name(args)), std=SWAV_STD,
                      workers=args.workers) if args.knn_freq else None
    sanity.report(info, small.describe(args), sanity.amp_notice(args, info.device),
                  sanity.warmup_warning(args.warmup_epochs, args.epochs),
                  sanity.image_size_warning(train_set, max(args.size_crops), "--size_crops", "training crops"),
                  sanity.knn_image_size_warning(knn, args.image_size))
    if info.is_main:
        save_args(args, out)
    cfg = engine_config(args, batch_size=args.batch_size, output_dir=out, method_name=name, workers=args.workers,
                        checkpoint=swav_checkpoint_policy(out, args.checkpoint_freq, zero_based=True))
    torch.backends.cudnn.benchmark = True
    Trainer(method, optimizer, schedule, train_set, cfg, info, knn).fit()


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    check_args(args)   # fail fast, before any process group
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
