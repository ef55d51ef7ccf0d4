#!/usr/bin/env python
"""LORAC pretraining (ssl-codelab/lorac ``main_lorac.py`` flags; moco_m_lorac.md §2, §8.2).

    python -m torch.distributed.launch --nproc_per_node=4 main_lorac.py --data_path /imagenet/train \
        --nmb_crops 3 5 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14 \
        --crops_for_assign 0 1 --moco-dim 128 --moco-k 65536 --moco-m 0.999 --temperature 0.2 --mlp true \
        --epochs 200 --batch_size 64 --base_lr 1.8 --final_lr 0.018 --wd 1e-6 --warmup_epochs 0 \
        --checkpoint_freq 1 --arch mocom_r50 --use_fp16 true --sync_bn pytorch --dump_path /exp \
        --lorac_beta 15. --epoch_lorac_starts 100

MoCo-M's model, data, optimiser and checkpoints (``main_moco_m.py``) with LORAC's pairing and, from
``--epoch_lorac_starts`` on, the per-sample nuclear norm of [3 global queries; 2 keys] subtracted
(÷ ``--lorac_beta``) from the positive logit; as in the official code the logits then lose the
temperature (``--lorac_use_temperature true`` keeps it).
"""
from __future__ import annotations

import argparse
import logging

import main_moco_m
from src import distributed as D
from src import sanity
from src.cli import HelpFormatter, add_engine_args, prepare_data
from src.data import small
from src.errors import cli_main
from src.methods.mocom import MoCoM, convert_sync_bn
from src.models.backbones import arch_spec
from src.multicrop import (add_larc_args, add_moco_args, add_multicrop_data_args, add_run_args, check_mocom_args,
                           larc_with_cosine, resolve_data_path)

log = logging.getLogger("ssl")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LORAC pretraining (multi-crop MoCo with a low-rank prior, LARC, "
                                "per-iteration cosine)", formatter_class=HelpFormatter)
    g = add_multicrop_data_args(p)
    g.add_argument("--color_distortion_scale", type=float, default=1.0, help="s in ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)")
    add_moco_args(p, temperature_help="InfoNCE temperature (LORAC: only before --epoch_lorac_starts by default)")
    g = p.add_argument_group("LORAC")
    g.add_argument("--lorac_beta", type=float, default=15.0,
                   help="divisor of the per-sample nuclear norm subtracted from the positive logit")
    g.add_argument("--epoch_lorac_starts", type=int, default=100, help="first (0-based) epoch with the low-rank prior")
    g.add_argument("--lorac_use_temperature", type=D.str2bool, default=False,
                   help="after the switch divide the low-rank logits by --temperature "
                        "(official: false, the logits are raw cosines)")
    g.add_argument("--lorac_negatives", choices=["other_plane", "key_plane"], default="other_plane",
                   help="queue plane of the negatives: other_plane (official: plane 1-j for key crop j) "
                        "or key_plane (the plane of the positive key's crop)")
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
    pairing = "lorac" if args.lorac_negatives == "other_plane" else "key_crop"
    method = MoCoM(args.arch, args.moco_dim, args.moco_k, args.moco_m, args.temperature, args.mlp,
                   args.nmb_crops, pairing, lorac=True, beta=args.lorac_beta,
                   epoch_lorac_starts=args.epoch_lorac_starts, lorac_use_temperature=args.lorac_use_temperature,
                   shuffle_groups=args.shuffle_bn_groups, cifar_stem=args.cifar_stem)
    sync = convert_sync_bn(method, args.sync_bn, args.syncbn_process_group_size, info.device)
    method = method.to(info.device)
    log.info("crops %s at %s px | pairing %s | sync BN: %s | queue 2 x %d x %d | LORAC beta %s from epoch %d, "
             "temperature after the switch: %s", args.nmb_crops, args.size_crops, pairing, sync, args.moco_dim,
             args.moco_k, args.lorac_beta, args.epoch_lorac_starts, args.lorac_use_temperature)
    # apex LARC over SGD(model.parameters()): every parameter, no exclusions (encoder_k never has a grad)
    optimizer, schedule = larc_with_cosine(method.parameters(), args)
    return method, optimizer, schedule


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    main_moco_m.fit(info, args, "lorac", build_method)


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    arch_spec(args.arch)   # fail fast, before any process group
    check_mocom_args(args)
    prepare_data(args, resolve_data_path(args.data_path, quiet=True, dataset=small.dataset_name(args)), sub=None)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
