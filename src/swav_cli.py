"""Flags and entry point of ``main_swav.py`` and ``main_swav_distill.py`` (swav.md §5, A7).

The flags are the official ones with their defaults and meanings (``--batch_size`` per process, the
lr not scaled, ``--data_path`` the train folder itself, ``--queue_length`` global and trimmed to a
multiple of the global batch). Outputs under ``--dump_path``: ``checkpoint.pth.tar`` every epoch
(auto-resumed; it holds every rank's queue), ``checkpoints/ckp-{epoch}.pth`` when ``epoch %
checkpoint_freq == 0`` (0-based, as SwAV) and at the last epoch, ``args.json``, ``log.jsonl``, ``tb/``.
"""
from __future__ import annotations

import argparse
import logging
import os

from . import distributed as D
from . import sanity
from .cli import HelpFormatter, add_engine_args, engine_config, knn_monitor, print_setup
from .errors import UserError, cli_main
from .multicrop import resolve_data_path

log = logging.getLogger("ssl")

DEFAULT_TEACHER = "path"   # the official default of --pretrained / --teacher (D L140-143)


def get_parser(distill: bool) -> argparse.ArgumentParser:
    name = "DisCo + SwAV" if distill else "SwAV"
    p = argparse.ArgumentParser(description=f"{name} pretraining (multi-crop, Sinkhorn-Knopp codes, LARC, per-iteration cosine)",
                                formatter_class=HelpFormatter)
    b = D.str2bool
    g = p.add_argument_group("data")
    g.add_argument("--data_path", "--data-path", dest="data_path", type=str, default="/path/to/imagenet",
                   help="ImageFolder root used directly: pass .../train")
    g.add_argument("--nmb_crops", type=int, default=[2], nargs="+", help="crops per resolution group")
    g.add_argument("--size_crops", type=int, default=[224], nargs="+", help="crop size per group")
    g.add_argument("--min_scale_crops", type=float, default=[0.14], nargs="+", help="RandomResizedCrop min scale per group")
    g.add_argument("--max_scale_crops", type=float, default=[1.0], nargs="+", help="RandomResizedCrop max scale per group")
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
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", default=100, type=int, help="training epochs")
    g.add_argument("--batch_size", "--batch-size", dest="batch_size", default=64, type=int,
                   help="batch per process (global = batch_size x processes)")
    g.add_argument("--base_lr", default=4.8, type=float, help="peak lr (LARC, not scaled by the batch)")
    g.add_argument("--final_lr", type=float, default=0.0, help="cosine floor (not scaled by the batch)")
    g.add_argument("--freeze_prototypes_niters", default=313, type=int,
                   help="global iterations (epoch x iterations per epoch + it) with the prototypes frozen")
    g.add_argument("--wd", default=1e-6, type=float, help="weight decay, folded into LARC")
    g.add_argument("--warmup_epochs", default=10, type=int, help="linear warmup epochs")
    g.add_argument("--start_warmup", default=0.0, type=float, help="lr at the start of the warmup")
    D.add_dist_args(p)
    g = p.add_argument_group("other")
    g.add_argument("--arch", "-a", default="resnet50", type=str, help="any registered backbone (resnet50, efficientb0, ...)")
    g.add_argument("--hidden_mlp", default=2048, type=int, help="hidden width of the projection head (0: linear head)")
    g.add_argument("--workers", default=10, type=int, help="data loading workers per process")
    g.add_argument("--checkpoint_freq", type=int, default=25,
                   help="copy checkpoint.pth.tar to checkpoints/ckp-{epoch}.pth when epoch %% freq == 0 and at the end")
    g.add_argument("--sync_bn", type=str, default="pytorch",
                   help="pytorch | apex: SyncBatchNorm for the whole model (GPU only); anything else: none")
    g.add_argument("--syncbn_process_group_size", type=int, default=8, help="process group size of --sync_bn apex")
    g.add_argument("--dump_path", type=str, default=".", help="output dir (checkpoint, logs, args)")
    g.add_argument("--seed", type=int, default=31, help="seed of torch / numpy / random (same on every rank)")
    g.add_argument("--resume", default=None, type=str, help="checkpoint to resume from (None: <dump_path>/checkpoint.pth.tar)")
    g.add_argument("--print_freq", type=int, default=50, help="log every N iterations")
    if distill:
        g = p.add_argument_group("teacher (DisCo + SwAV)")
        g.add_argument("--pretrained", default=DEFAULT_TEACHER, type=str,
                       help="teacher checkpoint: a SwAV raw state dict (swav_800ep_pretrain.pth.tar)")
        g.add_argument("--teacher", default=DEFAULT_TEACHER, type=str, help="unused, as in the official code")
        g.add_argument("--teacher_arch", default="SWAVresnet50",
                       help="SwAV-format teacher (official: hard-coded ResNet-50): SWAVresnet50, resnet50w2, DCresnet50, SELAresnet50")
        g.add_argument("--distill_normalize_teacher", type=b, default=False,
                       help="L2-normalise the teacher's projection before the MSE (official false: the normalised "
                            "student is compared with the raw teacher projection)")
    add_engine_args(p, output_default="--dump_path", fp16_default=True)
    return p


def check_args(args: argparse.Namespace) -> None:
    from .methods.swav import check_crops_for_assign
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
    if getattr(args, "distill", False):
        from .models.swav_resnet import SWAV_TEACHERS
        if args.teacher_arch not in SWAV_TEACHERS:
            raise UserError(f"--teacher_arch {args.teacher_arch!r}: choose a SwAV-format teacher: {', '.join(SWAV_TEACHERS)}")
        if not os.path.isfile(args.pretrained):  # official: trains against a random teacher with one log line
            raise UserError(f"--pretrained teacher checkpoint not found: {args.pretrained}")


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    import torch
    from .data.datasets import ImageDataset
    from .data.transforms import SWAV_STD, MultiCropTransform
    from .engine import CheckpointPolicy, Trainer, seed_everything
    from .logger import save_args, setup_logging
    from .methods.swav import SwAV, trimmed_queue_length
    from .optim import LARC, SwAVCosineLR

    out = args.output_dir or args.dump_path
    os.makedirs(out, exist_ok=True)
    setup_logging(out, info.rank)
    seed_everything(args.seed)
    B, W = args.batch_size, info.world_size
    queue_length = trimmed_queue_length(args.queue_length, B, W)
    if args.queue_length and not queue_length:
        raise UserError(f"--queue_length {args.queue_length} is shorter than the global batch {B * W}: "
                        "no queue would be built; raise it or pass 0")
    if queue_length != args.queue_length:
        log.warning("--queue_length %d trimmed to %d, a multiple of the global batch %d (official behaviour)",
                    args.queue_length, queue_length, B * W)
    data_path = resolve_data_path(args.data_path)
    transform = MultiCropTransform(args.size_crops, args.nmb_crops, args.min_scale_crops, args.max_scale_crops,
                                   color_distortion_scale=1.0, std=SWAV_STD)
    train_set = ImageDataset(data_path, transform, seed=args.data_seed)
    if info.is_main:
        log.info("Building data done with %d images loaded.", len(train_set))
    kw = dict(crops_for_assign=args.crops_for_assign, hidden_mlp=args.hidden_mlp, feat_dim=args.feat_dim,
              nmb_prototypes=args.nmb_prototypes, temperature=args.temperature, epsilon=args.epsilon,
              sinkhorn_iterations=args.sinkhorn_iterations, queue_length=queue_length,
              epoch_queue_starts=args.epoch_queue_starts, freeze_prototypes_niters=args.freeze_prototypes_niters,
              world_size=W, cifar_stem=args.cifar_stem)
    teacher_desc = ""
    if args.distill:
        from .methods.swav_distill import SwAVDistill
        from .models.teacher import load_teacher
        if args.teacher != DEFAULT_TEACHER:
            log.warning("--teacher is unused (as in the official code): the teacher is --pretrained")
        teacher, tinfo = load_teacher(args.pretrained, args.teacher_arch, args.feat_dim)
        method = SwAVDistill(args.arch, args.nmb_crops, teacher=teacher, normalize_teacher=args.distill_normalize_teacher,
                             teacher_info=tinfo.record(), **kw)
        teacher_desc = (f" | teacher {args.teacher_arch} ({tinfo.head.replace(', L2-normalised', '')}, eval mode), MSE "
                        f"mean / {len(args.crops_for_assign)} against the {'normalised' if args.distill_normalize_teacher else 'raw'} "
                        "teacher projection")
    else:
        method = SwAV(args.arch, args.nmb_crops, **kw)
    sync = method.convert_sync_bn(args.sync_bn, args.syncbn_process_group_size, info.device)
    method = method.to(info.device)
    # S L171-177: LARC over SGD(model.parameters()), one group, prototypes and BN included (teacher excluded)
    optimizer = LARC(method.trainable_parameters(), lr=args.base_lr, momentum=0.9, weight_decay=args.wd,
                     trust_coefficient=0.001, clip=False, eps=1e-8)
    schedule = SwAVCosineLR(args.base_lr, args.final_lr, args.epochs, args.warmup_epochs, args.start_warmup)
    print_setup(info, B, f"base_lr {args.base_lr} -> final_lr {args.final_lr} (LARC trust 0.001, not scaled)",
                f"cosine per iteration, {args.warmup_epochs} warmup epochs from {args.start_warmup}")
    log.info("crops %s at %s px, assign %s | %d prototypes x %d, tau %g, eps %g, %d SK iterations | queue %d global "
             "(%d per process) from epoch %d | prototypes frozen for %d iterations | sync BN: %s%s",
             args.nmb_crops, args.size_crops, args.crops_for_assign, args.nmb_prototypes, args.feat_dim,
             args.temperature, args.epsilon, args.sinkhorn_iterations, queue_length, queue_length // W,
             args.epoch_queue_starts, args.freeze_prototypes_niters, sync, teacher_desc)
    if info.is_main:
        save_args(args, out)
    freq = args.checkpoint_freq
    policy = CheckpointPolicy(
        out, filename=lambda e: "checkpoint.pth.tar", fixed_resume_name="checkpoint.pth.tar",
        copies=lambda e, n: [os.path.join(out, "checkpoints", f"ckp-{e}.pth")] if e % freq == 0 or e + 1 == n else [])
    cfg = engine_config(args, batch_size=B, output_dir=out, checkpoint=policy,
                        method_name="swav_distill" if args.distill else "swav", workers=args.workers)
    knn = knn_monitor(args, os.path.dirname(os.path.abspath(data_path)), std=SWAV_STD) if args.knn_freq else None
    sanity.report(info, sanity.amp_notice(args, info.device), sanity.warmup_warning(args.warmup_epochs, args.epochs),
                  sanity.image_size_warning(train_set, max(args.size_crops), "--size_crops", "training crops"),
                  sanity.knn_image_size_warning(knn, args.image_size))
    torch.backends.cudnn.benchmark = True
    Trainer(method, optimizer, schedule, train_set, cfg, info, knn).fit()


def run(argv: list[str] | None, distill: bool) -> None:
    from .models.backbones import arch_spec
    args = sanity.parse_args(lambda: get_parser(distill), argv)
    args.distill = distill
    arch_spec(args.arch)   # fail fast, before any process group
    check_args(args)
    resolve_data_path(args.data_path, quiet=True)
    D.launch(main_worker, args)


@cli_main
def main_swav(argv: list[str] | None = None) -> None:
    run(argv, distill=False)


@cli_main
def main_swav_distill(argv: list[str] | None = None) -> None:
    run(argv, distill=True)
