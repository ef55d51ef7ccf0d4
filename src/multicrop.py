"""Pieces shared by the SwAV-style multi-crop entry scripts (``main_moco_m.py``, ``main_lorac.py``;
moco_m_lorac.md §8): their argument groups (multi-crop data, MoCo, LARC optimisation, run), the
multi-crop dataset, LARC + per-iteration cosine, and the checkpoint layout of the official SwAV
family: ``<dump_path>/checkpoint.pth.tar`` every epoch (auto-resumed) and a copy
``checkpoints/ckp-{epoch}.pth`` every ``--checkpoint_freq`` epochs and at the last one.

Flag meanings, as the official scripts: ``--batch_size`` is per process (global = batch_size ×
processes), the lr is not scaled by the batch, ``--data_path`` is the train folder itself.
"""
from __future__ import annotations

import argparse
import logging
import os

from . import distributed as D
from .data import small
from .data.datasets import ImageDataset, find_classes
from .data.transforms import SWAV_STD, MultiCropTransform
from .engine import CheckpointPolicy
from .errors import UserError

log = logging.getLogger("ssl")


# ----------------------------------------------------------------------------- flags
def add_multicrop_data_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--data_path`` and the crop groups; returns the group so a script can add its own data flags."""
    g = p.add_argument_group("data")
    g.add_argument("--data_path", "--data-path", dest="data_path", type=str, default="/path/to/imagenet",
                   help="ImageFolder root used directly: pass .../train (a root holding only train/ val/ is "
                        "accepted and its train/ is used); the kNN monitor looks for <data_path>/../val. "
                        "--dataset cifar10/cifar100/stl10: the folder holding their files")
    g.add_argument("--nmb_crops", type=int, default=[2], nargs="+", help="crops per resolution group")
    g.add_argument("--size_crops", type=int, default=[224], nargs="+", help="crop size (px) per group")
    g.add_argument("--min_scale_crops", type=float, default=[0.14], nargs="+", help="RandomResizedCrop min scale per group")
    g.add_argument("--max_scale_crops", type=float, default=[1.0], nargs="+", help="RandomResizedCrop max scale per group")
    return g


def add_moco_args(p: argparse.ArgumentParser, temperature_help: str = "InfoNCE temperature") -> argparse._ArgumentGroup:
    """MoCo-M's key encoder, queue and head (``--crops_for_assign`` must be 0 1: crops 0 and 1 are keys)."""
    g = p.add_argument_group("MoCo")
    g.add_argument("--crops_for_assign", type=int, nargs="+", default=[0, 1],
                   help="key crops looped over in the loss; must be 0 1")
    g.add_argument("--moco-dim", "--moco_dim", dest="moco_dim", default=128, type=int, help="embedding dim")
    g.add_argument("--moco-k", "--moco_k", dest="moco_k", default=65536, type=int,
                   help="queue length per plane; must be divisible by the global batch")
    g.add_argument("--moco-m", "--moco_m", dest="moco_m", default=0.999, type=float, help="EMA momentum (constant)")
    g.add_argument("--mlp", type=D.str2bool, default=True, help="2-layer MLP head F→F→dim without BN (true/false)")
    g.add_argument("--temperature", default=0.2, type=float, help=temperature_help)
    g.add_argument("--hidden_mlp", default=2048, type=int,
                   help="accepted for the official command lines; the MLP hidden width is always the backbone's "
                        "feature dim (as the official code), so any other value is refused")
    return g


def add_larc_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Epochs, per-process batch and LARC + per-iteration cosine (the official SwAV defaults)."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", default=100, type=int, help="training epochs")
    g.add_argument("--batch_size", "--batch-size", dest="batch_size", default=64, type=int,
                   help="batch PER PROCESS (global = batch_size x processes)")
    g.add_argument("--base_lr", default=4.8, type=float,
                   help="peak lr of LARC, used as given (NOT scaled by the batch)")
    g.add_argument("--final_lr", type=float, default=0.0, help="floor of the cosine (not scaled)")
    g.add_argument("--wd", default=1e-6, type=float, help="weight decay, folded into LARC")
    g.add_argument("--warmup_epochs", default=10, type=int, help="linear warmup epochs")
    g.add_argument("--start_warmup", default=0.0, type=float, help="lr at the start of the warmup")
    return g


def add_run_args(p: argparse.ArgumentParser, *, checkpoint_freq: int = 10, print_freq: int = 100,
                 zero_based_copies: bool = False,
                 arch_help: str = "mocom_r50, mocom_r18 or any registered backbone (resnet50 = mocom_r50)",
                 sync_bn_help: str = "pytorch | apex: SyncBatchNorm for encoder_q (GPU only); anything else: none",
                 ) -> argparse._ArgumentGroup:
    """Arch, workers, checkpoints, sync BN, output, seed, resume, logging. The defaults differ between the
    official scripts (MoCo-M/LORAC: ``--checkpoint_freq 10``, ``--print_freq 100``, copies at
    ``(epoch+1) % freq == 0``; SwAV: 25, 50, copies at ``epoch % freq == 0``), hence the parameters."""
    when = "epoch" if zero_based_copies else "(epoch+1)"
    g = p.add_argument_group("other")
    g.add_argument("--arch", "-a", default="resnet50", type=str, help=arch_help)
    g.add_argument("--workers", default=10, type=int, help="data loading workers per process")
    g.add_argument("--checkpoint_freq", type=int, default=checkpoint_freq,
                   help=f"copy checkpoint.pth.tar to checkpoints/ckp-{{epoch}}.pth when {when} %% freq == 0 and at the end")
    g.add_argument("--sync_bn", type=str, default="pytorch", help=sync_bn_help)
    g.add_argument("--syncbn_process_group_size", type=int, default=8, help="process group size of --sync_bn apex")
    g.add_argument("--dump_path", type=str, default=".", help="output dir (checkpoint, logs, args)")
    g.add_argument("--seed", type=int, default=31, help="seed of torch / numpy / random (same on every rank)")
    g.add_argument("--resume", default=None, type=str,
                   help="checkpoint to resume from (None: <dump_path>/checkpoint.pth.tar if present)")
    g.add_argument("--print_freq", type=int, default=print_freq, help="log every N iterations")
    return g


# ----------------------------------------------------------------------------- checks and builders
def check_multicrop_args(args: argparse.Namespace) -> None:
    n = len(args.size_crops)
    if not (len(args.nmb_crops) == len(args.min_scale_crops) == len(args.max_scale_crops) == n):
        raise UserError("--size_crops, --nmb_crops, --min_scale_crops and --max_scale_crops must have the same length")
    if args.checkpoint_freq < 1:
        raise UserError("--checkpoint_freq must be >= 1")


def check_mocom_args(args: argparse.Namespace) -> None:
    """:func:`check_multicrop_args` plus what MoCo-M / LORAC cannot run with (flags of :func:`add_moco_args`)."""
    check_multicrop_args(args)
    if list(args.crops_for_assign) != [0, 1]:
        raise UserError(f"--crops_for_assign must be 0 1 (got {args.crops_for_assign}): the key encoder embeds "
                        "crops 0 and 1 only")
    if args.nmb_crops[0] < 2:
        raise UserError("--nmb_crops: the first group needs at least 2 crops (the key crops 0 and 1)")
    if args.hidden_mlp != 2048:
        raise UserError(f"--hidden_mlp {args.hidden_mlp}: the MLP hidden width is always the backbone's feature "
                        "dim, as in the official code; drop the flag (or pass 2048)")


def resolve_data_path(path: str, quiet: bool = False, dataset: str = "folder") -> str:
    """The official code uses ``--data_path`` as the ImageFolder root. A dataset root that holds only
    ``train/`` (``val/``, ``test/``) would silently train on all splits as 'classes': use its train/.
    A small dataset (``--dataset cifar10`` ...) is read from ``path`` itself."""
    if not path or not os.path.isdir(path):
        raise UserError(f"data directory not found: {path}")
    if dataset in small.SMALL_DATASETS:
        return path
    classes = find_classes(path)
    if "train" in classes and set(classes) <= {"train", "val", "test"}:
        if not quiet:
            log.warning("--data_path %s holds %s: using %s/train (pass the train folder itself, as the official README)",
                        path, "/".join(classes), path)
        path = os.path.join(path, "train")
        find_classes(path)
    return path


def knn_root(data_path: str, dataset: str = "folder") -> str:
    """The kNN monitor's root: ``<data_path>/..`` (bank ``../train``, queries ``../val``); a small
    dataset's own folder (its train and test splits)."""
    return data_path if dataset in small.SMALL_DATASETS else os.path.dirname(os.path.abspath(data_path))


def multicrop_dataset(args: argparse.Namespace, data_path: str, color_distortion_scale: float = 1.0,
                      std=SWAV_STD) -> ImageDataset:
    """The multi-crop training set; under the small-image preset with its mean/std and, at 32 px, no blur
    (the crop sizes and scales were set in ``args`` by :func:`src.data.small.apply_presets`)."""
    p = small.preset_of(args)
    kw = dict(std=std) if p is None else dict(std=tuple(p["std"]), mean=tuple(p["mean"]),
                                              blur_p=0.5 if p["blur"] else 0.0)
    transform = MultiCropTransform(args.size_crops, args.nmb_crops, args.min_scale_crops, args.max_scale_crops,
                                   color_distortion_scale=color_distortion_scale, **kw)
    return small.pretraining_set(args, data_path, transform, train_sub=None)


def larc_with_cosine(params, args: argparse.Namespace):
    """apex LARC over SGD (momentum 0.9, trust 0.001, no clipping) and the per-iteration cosine from
    ``--base_lr`` to ``--final_lr`` after ``--warmup_epochs`` of linear warmup from ``--start_warmup``."""
    from .optim import LARC, SwAVCosineLR
    optimizer = LARC(params, lr=args.base_lr, momentum=0.9, weight_decay=args.wd,
                     trust_coefficient=0.001, clip=False, eps=1e-8)
    schedule = SwAVCosineLR(args.base_lr, args.final_lr, args.epochs, args.warmup_epochs, args.start_warmup)
    return optimizer, schedule


def swav_checkpoint_policy(out: str, checkpoint_freq: int, zero_based: bool = False) -> CheckpointPolicy:
    """``checkpoint.pth.tar`` every epoch (auto-resumed) and ``checkpoints/ckp-{epoch}.pth`` when
    ``(epoch + 1) % checkpoint_freq == 0`` (MoCo-M/LORAC) or ``epoch % checkpoint_freq == 0``
    (``zero_based``: SwAV), and at the last epoch."""
    shift = 0 if zero_based else 1

    def copies(e: int, n: int) -> list[str]:
        if (e + shift) % checkpoint_freq == 0 or e + 1 == n:
            return [os.path.join(out, "checkpoints", f"ckp-{e}.pth")]
        return []
    return CheckpointPolicy(out, filename=lambda e: "checkpoint.pth.tar", fixed_resume_name="checkpoint.pth.tar",
                            copies=copies)
