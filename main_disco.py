#!/usr/bin/env python
"""DisCo pretraining: a MoCo v2 student distilled from a frozen teacher (DisCo ``DisCo/main.py``;
``--distill rkd`` is ``main_moco_distill_rkd.py``). Spec: disco_pcl_evals.md A2-A6, D1.

    python main_disco.py -a efficientb0 --lr 0.03 --batch-size 256 --moco-t 0.2 --aug-plus \
        --dist-url 'tcp://localhost:10043' --multiprocessing-distributed --world-size 1 --rank 0 --mlp --cos \
        --teacher_arch resnet50 --teacher /path/to/checkpoint_0199.pth.tar /path/to/imagenet
    # RKD / RKD+DisCo baselines (Tab2)
    python main_disco.py --distill rkd [--use-mse] -a efficientb0 ... --teacher teacher_res50.pth.tar /data

``-b`` is the batch of one node (split over its processes); the lr is not scaled. The distillation is
the official per-process ``sum`` (``--distill_reduction mean --distill_weight 32`` is the equivalent per
sample mean for the official 32 images per GPU). The teacher (``--teacher_arch``, ``--teacher``: see
``src/models/teacher.py`` for the accepted files) is frozen, and its BatchNorm follows the official
train mode unless ``--teacher_bn eval``. Checkpoints ``checkpoint_{epoch:04d}.pth.tar`` go to
``--output_dir`` (default: the current directory) without the teacher (``--save_teacher`` keeps it);
they record its path, arch and sha256, and a resume with a different teacher file is refused.
"""
from __future__ import annotations

import argparse
import logging
import os

from src import distributed as D
from src import sanity, zoo
from src.checkpoint import latest_checkpoint
from src.cli import (HelpFormatter, add_engine_args, add_moco_script_args, engine_config, knn_monitor, moco_two_crops,
                     per_process, prepare_data, print_setup, workers_per_process)
from src.data import small
from src.engine import CheckpointPolicy, Trainer, seed_everything
from src.errors import UserError, cli_main
from src.logger import save_args, setup_logging
from src.methods.disco import DisCo
from src.models.backbones import arch_spec
from src.models.momentum import default_shuffle_groups
from src.models.queue import check_queue_divisible
from src.models.teacher import TEACHER_ARCHS, load_teacher

log = logging.getLogger("ssl")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DisCo pretraining (student distilled from a frozen teacher)",
                                formatter_class=HelpFormatter)
    add_moco_script_args(p, arch_help="student arch (efficientb0, efficientb1, mobilenetv3, resnet18, ...)")
    p.add_argument("--resume-ckpt", "--resume_ckpt", dest="resume_ckpt", action="store_true",
                   help="official: resume from the newest checkpoint in ./ckpt")
    p.add_argument("--moco-dim", "--moco_dim", dest="moco_dim", default=128, type=int, help="embedding dim")
    p.add_argument("--moco-k", "--moco_k", dest="moco_k", default=65536, type=int,
                   help="queue length; must be divisible by the global batch")
    p.add_argument("--moco-m", "--moco_m", dest="moco_m", default=0.999, type=float, help="EMA momentum of the key encoder")
    p.add_argument("--moco-t", "--moco_t", dest="moco_t", default=0.07, type=float, help="InfoNCE temperature")
    p.add_argument("--mlp", action="store_true", help="MLP heads: student Linear(F,--hidden)-ReLU-Linear(--hidden,128)")
    p.add_argument("--aug-plus", "--aug_plus", dest="aug_plus", action="store_true", help="MoCo v2 augmentation")
    p.add_argument("--cos", action="store_true", help="per-epoch cosine lr")
    p.add_argument("--hidden", default=2048, type=int,
                   help="student MLP width (official: hard-coded 2048; Reproduction's Tab4 command passes --hidden 2048)")
    g = p.add_argument_group("teacher and distillation")
    g.add_argument("--teacher_arch", "--teacher-arch", dest="teacher_arch", default="resnet50", choices=TEACHER_ARCHS,
                   help="teacher backbone")
    g.add_argument("--teacher", default="", type=str, help="teacher checkpoint (MoCo-style or SwAV raw state dict): "
                   "a path, an http(s) URL or a zoo name such as moco_v2_r50_e800 (python -m src.zoo list)")
    g.add_argument("--nmb_prototypes", default=0, type=int, help="official SwAV-teacher prototypes: must stay 0")
    g.add_argument("--only-mse", "--only_mse", dest="only_mse", action="store_true",
                   help="distillation loss only (InfoNCE weight 0)")
    g.add_argument("--distill", choices=["mse", "rkd"], default="mse",
                   help="mse: DisCo (DisCo/main.py); rkd: RKD distance+angle (main_moco_distill_rkd.py)")
    g.add_argument("--use-mse", "--use_mse", dest="use_mse", action="store_true",
                   help="with --distill rkd: add DisCo's distillation (RKD+DisCo)")
    g.add_argument("--distill_reduction", "--distill-reduction", choices=["sum", "mean"], default="sum",
                   help="sum over the per-process batch and dims (official) or per-sample mean")
    g.add_argument("--distill_weight", "--distill-weight", type=float, default=1.0, help="weight of the distillation term")
    g.add_argument("--teacher_bn", "--teacher-bn", choices=["train", "eval"], default="train",
                   help="train: batch statistics of each process's batch (official); eval: running statistics")
    g.add_argument("--save_teacher", "--save-teacher", action="store_true",
                   help="keep the teacher's weights in the checkpoints (official layout teacher_encoder_q.*)")
    p.add_argument("--shuffle_bn_groups", default=0, type=int,
                   help="single process: emulate shuffle-BN (and the teacher's per-GPU BN) with this many "
                        "groups (0: one per 32 images, max 8)")
    add_engine_args(p, knn_root="DIR")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flag errors before any process is spawned."""
    arch_spec(args.arch)
    prepare_data(args, args.data)
    if not args.teacher:
        raise UserError("--teacher is required: the checkpoint of the frozen teacher (see docs/disco.md)")
    args.teacher = zoo.resolve_arg(args.teacher, "--teacher")  # a URL / zoo name: downloaded before any process starts
    if args.nmb_prototypes:
        raise UserError("--nmb_prototypes must be 0: DisCo distils the teacher's normalised projection, not "
                        "SwAV prototype scores")
    if args.use_mse and args.distill != "rkd":
        raise UserError("--use-mse adds DisCo's loss to RKD: use it with --distill rkd")
    if args.only_mse and args.distill != "mse":
        raise UserError("--only-mse is a DisCo (--distill mse) option")
    if args.hidden <= 0:
        raise UserError(f"--hidden {args.hidden}: the student's MLP width must be positive")
    if args.resume_ckpt and not args.resume:
        args.resume = latest_checkpoint("ckpt") or ""


def build_method(args: argparse.Namespace, info: D.DistInfo, batch: int, teacher, teacher_info: dict):
    """(method with the frozen ``teacher`` on the device, SGD over the student, lr schedule) for a
    per-process ``batch``; scripts/benchmark_train.py builds the method with this too."""
    import torch

    from src.optim import MoCoEpochLR
    groups = args.shuffle_bn_groups or default_shuffle_groups(batch)
    method = DisCo(args.arch, teacher, args.teacher_arch, args.moco_dim, args.moco_k, args.moco_m, args.moco_t,
                   args.mlp, args.hidden, distill=args.distill, use_mse=args.use_mse, only_mse=args.only_mse,
                   reduction=args.distill_reduction, weight=args.distill_weight, teacher_bn=args.teacher_bn,
                   shuffle_groups=groups, cifar_stem=args.cifar_stem, teacher_info=teacher_info).to(info.device)
    optimizer = torch.optim.SGD(method.trainable_parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return method, optimizer, MoCoEpochLR(args.lr, args.epochs, args.cos, args.schedule)


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    out = args.output_dir or "."
    setup_logging(out, info.rank)
    seed_everything(args.seed if args.seed is not None else 0)
    batch = per_process(args.batch_size, info)
    workers = workers_per_process(args.workers, info)
    check_queue_divisible(args.moco_k, batch * info.world_size)
    train_set = small.pretraining_set(args, args.data, moco_two_crops(args))
    teacher, tinfo = load_teacher(args.teacher, args.teacher_arch, args.moco_dim)
    method, optimizer, schedule = build_method(args, info, batch, teacher, tinfo.record())
    what = "RKD" + (" + DisCo MSE" if args.use_mse else "") if args.distill == "rkd" else \
        ("DisCo MSE only" if args.only_mse else "InfoNCE + DisCo MSE")
    print_setup(info, batch, f"lr {args.lr} (not scaled)", "cosine per epoch" if args.cos else f"x0.1 at epochs {args.schedule}")
    log.info("student %s (head %s) <- teacher %s (%s, BN %s mode) | loss %s, distillation %s x %g%s", args.arch,
             f"MLP {args.hidden}" if args.mlp else "linear", args.teacher_arch, tinfo.head, args.teacher_bn, what,
             args.distill_reduction, args.distill_weight, " | teacher kept in checkpoints" if args.save_teacher else "")
    if info.is_main:
        save_args(args, out)
    cfg = engine_config(args, batch_size=batch, output_dir=out, checkpoint=CheckpointPolicy(out),
                        method_name="disco" if args.distill == "mse" else "disco_rkd", workers=workers)
    cfg.save_frozen = args.save_teacher
    knn = knn_monitor(args, args.data, workers=workers)
    sanity.report(info, small.describe(args), sanity.amp_notice(args, info.device),
                  sanity.lr_warning("disco", args.lr, batch * info.world_size, "--lr, not scaled"),
                  sanity.image_size_warning(train_set, args.image_size, "--image_size", "training crops"),
                  sanity.knn_image_size_warning(knn, args.image_size))
    Trainer(method, optimizer, schedule, train_set, cfg, info, knn).fit()


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    check_args(args)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
