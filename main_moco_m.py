#!/usr/bin/env python
"""MoCo-M pretraining (ssl-codelab/lorac ``main_moco_m.py`` flags; moco_m_lorac.md §1, §3-5, §8.1).

    python -m torch.distributed.launch --nproc_per_node=4 main_moco_m.py --data_path /imagenet/train \
        --nmb_crops 3 5 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14 \
        --crops_for_assign 0 1 --moco-dim 128 --moco-k 65536 --moco-m 0.999 --temperature 0.2 --mlp true \
        --epochs 200 --batch_size 64 --base_lr 1.8 --final_lr 0.018 --wd 1e-6 --warmup_epochs 0 \
        --checkpoint_freq 1 --arch mocom_r50 --use_fp16 true --sync_bn pytorch --dump_path /exp

``--batch_size`` is per process; the lr is not scaled; ``--data_path`` is the train folder itself.
``--mocom_query_exclude key_crop`` gives the intended pairing. Outputs under ``--dump_path``:
``checkpoint.pth.tar`` every epoch (auto-resumed), ``checkpoints/ckp-{epoch}.pth`` every
``--checkpoint_freq`` epochs and at the last, ``args.json``, ``log.jsonl``, ``logs/train.log``, ``tb/``.
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

from src import distributed as D
from src import sanity
from src.cli import HelpFormatter, add_engine_args, engine_config, knn_monitor, prepare_data, print_setup
from src.data import small
from src.data.transforms import SWAV_STD
from src.engine import Trainer, seed_everything
from src.errors import cli_main
from src.logger import save_args, setup_logging
from src.methods.mocom import MoCoM, convert_sync_bn
from src.models.backbones import arch_spec
from src.models.queue import check_queue_divisible
from src.multicrop import (add_larc_args, add_moco_args, add_multicrop_data_args, add_run_args,
                           check_mocom_args, knn_root, larc_with_cosine, multicrop_dataset, resolve_data_path,
                           swav_checkpoint_policy)

log = logging.getLogger("ssl")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MoCo-M pretraining (multi-crop MoCo, LARC, per-iteration cosine)",
                                formatter_class=HelpFormatter)
    g = add_multicrop_data_args(p)
    g.add_argument("--color_distortion_scale", type=float, default=1.0, help="s in ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)")
    g = add_moco_args(p)
    g.add_argument("--mocom_query_exclude", choices=["hardcoded1", "key_crop"], default="hardcoded1",
                   help="query crops of each key term: hardcoded1 (official: all but crop 1 for both keys, "
                        "so q0 meets k0) or key_crop (all but the key's own crop)")
    add_larc_args(p)
    D.add_dist_args(p)
    g = add_run_args(p)
    g.add_argument("--shuffle_bn_groups", type=int, default=1,
                   help="single process only: emulate shuffle-BN with this many key-encoder BN groups "
                        "(1: one BN batch, as the official code on one GPU)")
    add_engine_args(p, output_default="--dump_path", fp16_default=True, knn_root="<--data_path>/..")
    return p


def build_method(args: argparse.Namespace, info: D.DistInfo):
    """(method with sync BN on the device, LARC, per-iteration cosine); scripts/benchmark_train.py
    builds the method with this too."""
    method = MoCoM(args.arch, args.moco_dim, args.moco_k, args.moco_m, args.temperature, args.mlp,
                   args.nmb_crops, args.mocom_query_exclude, lorac=False,
                   shuffle_groups=args.shuffle_bn_groups, cifar_stem=args.cifar_stem)
    sync = convert_sync_bn(method, args.sync_bn, args.syncbn_process_group_size, info.device)
    method = method.to(info.device)
    log.info("crops %s at %s px | pairing %s | sync BN: %s | queue 2 x %d x %d", args.nmb_crops, args.size_crops,
             args.mocom_query_exclude, sync, args.moco_dim, args.moco_k)
    # apex LARC over SGD(model.parameters()): every parameter, no exclusions (encoder_k never has a grad)
    optimizer, schedule = larc_with_cosine(method.parameters(), args)
    return method, optimizer, schedule


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    fit(info, args, "mocom", build_method)


def fit(info: D.DistInfo, args: argparse.Namespace, name: str, build) -> None:
    """Data, ``build(args, info)`` → (method, optimizer, schedule), kNN monitor and engine: MoCo-M's run,
    and LORAC's (``main_lorac.py`` passes its own name and builder)."""
    out = args.output_dir or args.dump_path
    os.makedirs(out, exist_ok=True)
    setup_logging(out, info.rank)
    seed_everything(args.seed)
    check_queue_divisible(args.moco_k, args.batch_size * info.world_size)
    data_path = resolve_data_path(args.data_path, dataset=small.dataset_name(args))
    train_set = multicrop_dataset(args, data_path, args.color_distortion_scale)
    if info.is_main:
        log.info("Building data done with %d images loaded.", len(train_set))
    method, optimizer, schedule = build(args, info)
    print_setup(info, args.batch_size, f"base_lr {args.base_lr} -> final_lr {args.final_lr} (LARC trust 0.001, not scaled)",
                f"cosine per iteration, {args.warmup_epochs} warmup epochs from {args.start_warmup}")
    knn = knn_monitor(args, knn_root(data_path, small.dataset_name(args)), std=SWAV_STD,
                      workers=args.workers) if args.knn_freq else None
    sanity.report(info, small.describe(args), sanity.amp_notice(args, info.device),
                  sanity.warmup_warning(args.warmup_epochs, args.epochs),
                  sanity.lr_warning(name, args.base_lr, args.batch_size * info.world_size, "--base_lr"),
                  sanity.image_size_warning(train_set, max(args.size_crops), "--size_crops", "training crops"),
                  sanity.knn_image_size_warning(knn, args.image_size))
    if info.is_main:
        save_args(args, out)
    cfg = engine_config(args, batch_size=args.batch_size, output_dir=out,
                        checkpoint=swav_checkpoint_policy(out, args.checkpoint_freq), method_name=name,
                        workers=args.workers)
    torch.backends.cudnn.benchmark = True
    Trainer(method, optimizer, schedule, train_set, cfg, info, knn).fit()


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    arch_spec(args.arch)   # fail fast, before any process group
    check_mocom_args(args)
    prepare_data(args, resolve_data_path(args.data_path, quiet=True, dataset=small.dataset_name(args)), sub=None)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
