#!/usr/bin/env python
"""DisCo + SwAV pretraining (DisCo ``swav-master/main_swav_distill.py``; disco_pcl_evals.md A7, swav.md §3):
the flags of ``main_swav.py`` plus the frozen SwAV teacher.

    python -m torch.distributed.launch --nproc_per_node=8 main_swav_distill.py --data_path /imagenet/train \
        ... (the main_swav.py flags) ... --arch efficientb0 --pretrained swav_800ep_pretrain.pth.tar

The loss is SwAV's plus ``F.mse_loss(student, teacher) / len(crops_for_assign)`` with the student
normalised and the teacher not (official); ``--distill_normalize_teacher true`` compares two unit
vectors. Everything but the teacher is ``main_swav.py``'s (:func:`main_swav.fit`). See docs/swav.md.
"""
from __future__ import annotations

import argparse
import logging

import main_swav
from src import distributed as D
from src import sanity, zoo
from src.errors import UserError, cli_main
from src.methods.swav_distill import SwAVDistill
from src.models.swav_resnet import SWAV_TEACHERS
from src.models.teacher import load_teacher

log = logging.getLogger("ssl")

DEFAULT_TEACHER = "path"   # the official default of --pretrained / --teacher (D L140-143)


def get_parser() -> argparse.ArgumentParser:
    p = main_swav.get_parser("DisCo + SwAV pretraining (SwAV's multi-crop training plus an MSE to a frozen SwAV teacher)")
    g = p.add_argument_group("teacher (DisCo + SwAV)")
    g.add_argument("--pretrained", default=DEFAULT_TEACHER, type=str,
                   help="teacher checkpoint: a SwAV raw state dict (swav_800ep_pretrain.pth.tar): a path, a URL "
                        "or a zoo name (swav_r50_e800)")
    g.add_argument("--teacher", default=DEFAULT_TEACHER, type=str, help="unused, as in the official code")
    g.add_argument("--teacher_arch", default="SWAVresnet50",
                   help="SwAV-format teacher (official: hard-coded ResNet-50): " + ", ".join(SWAV_TEACHERS))
    g.add_argument("--distill_normalize_teacher", type=D.str2bool, default=False,
                   help="L2-normalise the teacher's projection before the MSE (official false: the normalised "
                        "student is compared with the raw teacher projection)")
    return p


def check_args(args: argparse.Namespace) -> None:
    main_swav.check_args(args)
    if args.teacher_arch not in SWAV_TEACHERS:
        raise UserError(f"--teacher_arch {args.teacher_arch!r}: choose a SwAV-format teacher: {', '.join(SWAV_TEACHERS)}")
    # official: a missing file trains against a random teacher with one log line; here a path, a URL or a zoo
    # name (swav_r50_e800), downloaded before any process starts, or one clear line
    args.pretrained = zoo.resolve(args.pretrained, "--pretrained teacher checkpoint")


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    out = main_swav.setup(info, args)
    if args.teacher != DEFAULT_TEACHER:
        log.warning("--teacher is unused (as in the official code): the teacher is --pretrained")
    teacher, tinfo = load_teacher(args.pretrained, args.teacher_arch, args.feat_dim)
    method = SwAVDistill(args.arch, args.nmb_crops, teacher=teacher, normalize_teacher=args.distill_normalize_teacher,
                         teacher_info=tinfo.record(), **main_swav.swav_kwargs(args, info.world_size))
    described = (f" | teacher {args.teacher_arch} ({tinfo.head.replace(', L2-normalised', '')}, eval mode), MSE "
                 f"mean / {len(args.crops_for_assign)} against the "
                 f"{'normalised' if args.distill_normalize_teacher else 'raw'} teacher projection")
    main_swav.fit(info, args, out, method, "swav_distill", described)


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    check_args(args)   # fail fast, before any process group
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
