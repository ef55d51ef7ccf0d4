"""Flags and entry point shared by ``main_moco_m.py`` and ``main_lorac.py`` (moco_m_lorac.md §8.1-8.2).

The flags are the official ones with their defaults and meanings (``--batch_size`` is per process,
the lr is not scaled, ``--data_path`` is the train folder itself), plus documented switches for
the corrected behaviours (README "Differences from the official code"). Outputs under
``--dump_path``: ``checkpoint.pth.tar`` every epoch (auto-resumed), ``checkpoints/ckp-{epoch}.pth``
every ``--checkpoint_freq`` epochs and at the last, ``args.json``, ``log.jsonl``, ``logs/train.log``,
``tb/``.
"""
from __future__ import annotations

import argparse
import logging
import os

from . import distributed as D
from .cli import add_engine_args, engine_config, knn_monitor, print_setup
from .errors import UserError, cli_main

log = logging.getLogger("ssl")


def get_parser(lorac: bool) -> argparse.ArgumentParser:
    name = "LORAC" if lorac else "MoCo-M"
    p = argparse.ArgumentParser(description=f"{name} pretraining (multi-crop MoCo, LARC, per-iteration cosine)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b = D.str2bool
    g = p.add_argument_group("data")
    g.add_argument("--data_path", "--data-path", dest="data_path", type=str, default="/path/to/imagenet",
                   help="ImageFolder root used directly: pass .../train (a root holding only train/ val/ is "
                        "accepted and its train/ is used)")
    g.add_argument("--nmb_crops", type=int, default=[2], nargs="+", help="crops per resolution group")
    g.add_argument("--size_crops", type=int, default=[224], nargs="+", help="crop size per group")
    g.add_argument("--min_scale_crops", type=float, default=[0.14], nargs="+", help="RandomResizedCrop min scale per group")
    g.add_argument("--max_scale_crops", type=float, default=[1.0], nargs="+", help="RandomResizedCrop max scale per group")
    g.add_argument("--crops_for_assign", type=int, nargs="+", default=[0, 1],
                   help="key crops looped over in the loss; must be 0 1")
    g.add_argument("--color_distortion_scale", type=float, default=1.0,
                   help="s in ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)")
    g = p.add_argument_group("MoCo")
    g.add_argument("--moco-dim", "--moco_dim", dest="moco_dim", default=128, type=int, help="embedding dim")
    g.add_argument("--moco-k", "--moco_k", dest="moco_k", default=65536, type=int,
                   help="queue length per plane; must be divisible by the global batch")
    g.add_argument("--moco-m", "--moco_m", dest="moco_m", default=0.999, type=float, help="EMA momentum (constant)")
    g.add_argument("--mlp", type=b, default=True, help="2-layer MLP head F→F→dim without BN (true/false)")
    g.add_argument("--temperature", default=0.2, type=float,
                   help="InfoNCE temperature" + (" (LORAC: only before --epoch_lorac_starts by default)" if lorac else ""))
    if lorac:
        g = p.add_argument_group("LORAC")
        g.add_argument("--lorac_beta", type=float, default=15.0,
                       help="divisor of the per-sample nuclear norm subtracted from the positive logit")
        g.add_argument("--epoch_lorac_starts", type=int, default=100,
                       help="first (0-based) epoch with the low-rank prior")
        g.add_argument("--lorac_use_temperature", type=b, default=False,
                       help="after the switch divide the low-rank logits by --temperature "
                            "(official: false, the logits are raw cosines)")
        g.add_argument("--lorac_negatives", choices=["other_plane", "key_plane"], default="other_plane",
                       help="queue plane of the negatives: other_plane (official: plane 1-j for key crop j) "
                            "or key_plane (the plane of the positive key's crop)")
    else:
        p.add_argument("--mocom_query_exclude", choices=["hardcoded1", "key_crop"], default="hardcoded1",
                       help="query crops of each key term: hardcoded1 (official: all but crop 1 for both keys, "
                            "so q0 meets k0) or key_crop (all but the key's own crop)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", default=100, type=int)
    g.add_argument("--batch_size", "--batch-size", dest="batch_size", default=64, type=int,
                   help="batch per process (global = batch_size x processes)")
    g.add_argument("--base_lr", default=4.8, type=float, help="peak lr (LARC, not scaled by the batch)")
    g.add_argument("--final_lr", type=float, default=0.0, help="cosine floor")
    g.add_argument("--wd", default=1e-6, type=float, help="weight decay, folded into LARC")
    g.add_argument("--warmup_epochs", default=10, type=int, help="linear warmup epochs")
    g.add_argument("--start_warmup", default=0.0, type=float, help="lr at the start of the warmup")
    D.add_dist_args(p)
    g = p.add_argument_group("other")
    g.add_argument("--arch", "-a", default="resnet50", type=str,
                   help="mocom_r50, mocom_r18 or any registered backbone (resnet50 = mocom_r50)")
    g.add_argument("--hidden_mlp", default=2048, type=int, help="unused, as in the official code (hidden = feature dim)")
    g.add_argument("--workers", default=10, type=int, help="data loading workers per process")
    g.add_argument("--checkpoint_freq", type=int, default=10,
                   help="copy checkpoint.pth.tar to checkpoints/ckp-{epoch}.pth when (epoch+1) %% freq == 0 and at the end")
    g.add_argument("--sync_bn", type=str, default="pytorch",
                   help="pytorch | apex: SyncBatchNorm for encoder_q (GPU only); anything else: none")
    g.add_argument("--syncbn_process_group_size", type=int, default=8, help="process group size of --sync_bn apex")
    g.add_argument("--dump_path", type=str, default=".", help="output dir (checkpoint, logs, args)")
    g.add_argument("--seed", type=int, default=31, help="seed of torch / numpy / random (same on every rank)")
    g.add_argument("--resume", default=None, type=str, help="checkpoint to resume from (default: <dump_path>/checkpoint.pth.tar)")
    g.add_argument("--print_freq", type=int, default=100, help="log every N iterations")
    g.add_argument("--shuffle_bn_groups", type=int, default=1,
                   help="single process only: emulate shuffle-BN with this many key-encoder BN groups "
                        "(1: one BN batch, as the official code on one GPU)")
    add_engine_args(p, output_default="--dump_path", fp16_default=True)
    return p


def resolve_data_path(path: str, quiet: bool = False) -> str:
    """The official code uses ``--data_path`` as the ImageFolder root. A dataset root that holds only
    ``train/`` (``val/``, ``test/``) would silently train on all splits as 'classes': use its train/."""
    from .data.datasets import find_classes
    if not path or not os.path.isdir(path):
        raise UserError(f"data directory not found: {path}")
    classes = find_classes(path)
    if "train" in classes and set(classes) <= {"train", "val", "test"}:
        if not quiet:
            log.warning("--data_path %s holds %s: using %s/train (pass the train folder itself, as the official README)",
                        path, "/".join(classes), path)
        path = os.path.join(path, "train")
        find_classes(path)
    return path


def check_args(args: argparse.Namespace) -> None:
    n = len(args.size_crops)
    if not (len(args.nmb_crops) == len(args.min_scale_crops) == len(args.max_scale_crops) == n):
        raise UserError("--size_crops, --nmb_crops, --min_scale_crops and --max_scale_crops must have the same length")
    if list(args.crops_for_assign) != [0, 1]:
        raise UserError(f"--crops_for_assign must be 0 1 (got {args.crops_for_assign}): the key encoder embeds "
                        "crops 0 and 1 only")
    if args.nmb_crops[0] < 2:
        raise UserError("--nmb_crops: the first group needs at least 2 crops (the key crops 0 and 1)")
    if args.checkpoint_freq < 1:
        raise UserError("--checkpoint_freq must be >= 1")


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    import torch
    from .data.datasets import ImageDataset
    from .data.transforms import SWAV_STD, MultiCropTransform
    from .engine import CheckpointPolicy, Trainer, seed_everything
    from .logger import save_args, setup_logging
    from .methods.mocom import MoCoM, convert_sync_bn
    from .models.queue import check_queue_divisible
    from .optim import LARC, SwAVCosineLR

    out = args.output_dir or args.dump_path
    os.makedirs(out, exist_ok=True)
    setup_logging(out, info.rank)
    seed_everything(args.seed)
    B = args.batch_size
    check_queue_divisible(args.moco_k, B * info.world_size)
    data_path = resolve_data_path(args.data_path)
    transform = MultiCropTransform(args.size_crops, args.nmb_crops, args.min_scale_crops, args.max_scale_crops,
                                   color_distortion_scale=args.color_distortion_scale, std=SWAV_STD)
    train_set = ImageDataset(data_path, transform, seed=args.data_seed)
    if info.is_main:
        log.info("Building data done with %d images loaded.", len(train_set))
    if args.lorac:
        pairing = "lorac" if args.lorac_negatives == "other_plane" else "key_crop"
    else:
        pairing = args.mocom_query_exclude
    method = MoCoM(args.arch, args.moco_dim, args.moco_k, args.moco_m, args.temperature, args.mlp,
                   args.nmb_crops, pairing, lorac=args.lorac,
                   beta=getattr(args, "lorac_beta", 15.0), epoch_lorac_starts=getattr(args, "epoch_lorac_starts", 100),
                   lorac_use_temperature=getattr(args, "lorac_use_temperature", False),
                   shuffle_groups=args.shuffle_bn_groups, cifar_stem=args.cifar_stem)
    sync = convert_sync_bn(method, args.sync_bn, args.syncbn_process_group_size, info.device)
    method = method.to(info.device)
    # apex LARC over SGD(model.parameters()): every parameter, no exclusions (encoder_k never has a grad)
    optimizer = LARC(method.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=args.wd,
                     trust_coefficient=0.001, clip=False, eps=1e-8)
    schedule = SwAVCosineLR(args.base_lr, args.final_lr, args.epochs, args.warmup_epochs, args.start_warmup)
    print_setup(info, B, f"base_lr {args.base_lr} -> final_lr {args.final_lr} (LARC trust 0.001, not scaled)",
                f"cosine per iteration, {args.warmup_epochs} warmup epochs from {args.start_warmup}")
    log.info("crops %s at %s px | pairing %s | sync BN: %s | queue 2 x %d x %d%s", args.nmb_crops, args.size_crops,
             pairing, sync, args.moco_dim, args.moco_k,
             f" | LORAC beta {args.lorac_beta} from epoch {args.epoch_lorac_starts}, "
             f"temperature after the switch: {args.lorac_use_temperature}" if args.lorac else "")
    if info.is_main:
        save_args(args, out)
    freq = args.checkpoint_freq
    policy = CheckpointPolicy(
        out, filename=lambda e: "checkpoint.pth.tar", fixed_resume_name="checkpoint.pth.tar",
        copies=lambda e, n: [os.path.join(out, "checkpoints", f"ckp-{e}.pth")] if (e + 1) % freq == 0 or e + 1 == n else [])
    cfg = engine_config(args, batch_size=B, output_dir=out, checkpoint=policy,
                        method_name="lorac" if args.lorac else "mocom", workers=args.workers)
    knn = knn_monitor(args, os.path.dirname(os.path.abspath(data_path)), std=SWAV_STD) if args.knn_freq else None
    torch.backends.cudnn.benchmark = True
    Trainer(method, optimizer, schedule, train_set, cfg, info, knn).fit()


def run(argv: list[str] | None, lorac: bool) -> None:
    from .models.backbones import arch_spec
    args = get_parser(lorac).parse_args(argv)
    args.lorac = lorac
    arch_spec(args.arch)   # fail fast, before any process group
    check_args(args)
    resolve_data_path(args.data_path, quiet=True)
    D.launch(main_worker, args)


@cli_main
def main_moco_m(argv: list[str] | None = None) -> None:
    run(argv, lorac=False)


@cli_main
def main_lorac(argv: list[str] | None = None) -> None:
    run(argv, lorac=True)
