"""Command-line pieces shared by the entry scripts: engine flags, data checks, the kNN monitor."""
from __future__ import annotations

import argparse
import logging
import os

from . import distributed as D
from .data import small
from .data.datasets import ImageDataset, find_classes
from .engine import CheckpointPolicy, EngineConfig, KnnMonitor
from .errors import UserError

log = logging.getLogger("ssl")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default exactly once: ``(default: X)`` is appended unless the help
    already states it (``(default`` in the text); a required positional has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "(default" in h or action.default is argparse.SUPPRESS:
            return h
        if not action.option_strings and action.nargs not in ("?", "*"):
            return h
        shown = "empty" if action.default == "" else "%(default)s"
        return (h + " " if h else "") + f"(default: {shown})"



def add_moco_script_args(p: argparse.ArgumentParser, *, arch_help: str = "backbone architecture",
                         print_freq: int = 10, resume_where: str = "--output_dir",
                         dist_url_default: str = "tcp://224.66.41.62:23456") -> None:
    """The flags facebookresearch/moco's ``main_moco.py`` defines and its descendants (DisCo's
    ``main.py``, PCL's ``main_pcl.py``) copy: data, arch, workers, epochs, batch (per node), lr (not
    scaled), step schedule, SGD, logging, resume, seed, distributed."""
    p.add_argument("data", metavar="DIR", help="dataset root: DIR/train for training, DIR/val for the kNN monitor "
                   "(--dataset cifar10/cifar100/stl10: the folder holding their files)")
    p.add_argument("-a", "--arch", default="resnet50", help=arch_help)
    p.add_argument("-j", "--workers", default=32, type=int, help="data loading workers per node")
    p.add_argument("--epochs", default=200, type=int, help="training epochs")
    p.add_argument("--start-epoch", "--start_epoch", dest="start_epoch", default=0, type=int,
                   help="first epoch when not resuming (a resumed checkpoint overrides it)")
    p.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", default=256, type=int,
                   help="batch PER NODE, split over its processes (global = batch x nodes)")
    p.add_argument("--lr", "--learning-rate", dest="lr", default=0.03, type=float,
                   help="initial lr, used as given (not scaled by the batch)")
    p.add_argument("--schedule", default=[120, 160], nargs="*", type=int, help="lr x0.1 epochs (without --cos)")
    p.add_argument("--momentum", default=0.9, type=float, help="SGD momentum")
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", default=1e-4, type=float, help="weight decay")
    p.add_argument("-p", "--print-freq", "--print_freq", dest="print_freq", default=print_freq, type=int,
                   help="log every N iterations")
    p.add_argument("--resume", default="", type=str, help=f"checkpoint to resume from (empty: the newest in {resume_where})")
    p.add_argument("--seed", default=None, type=int, help="seed of init and training randomness (None: 0)")
    D.add_dist_args(p, dist_url_default=dist_url_default)

def positive_int(v: str, least: int = 1) -> int:
    """argparse type: an integer >= 1 (argparse turns the error into one usage line)."""
    n = int(v)
    if n < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {v}")
    return n


def nonnegative_int(v: str) -> int:
    return positive_int(v, least=0)


def add_engine_args(p: argparse.ArgumentParser, *, output_default: str = ".", fp16_default: bool = False,
                    knn_root: str = "DIR", dataset_flag: bool = True) -> None:
    """The engine flags of every pretraining script; ``knn_root`` names where the kNN monitor finds
    ``train/`` and ``val/`` in terms of the script's data flag (e.g. ``<--data_path>/..``);
    ``dataset_flag=False`` for a script with its own ``--dataset`` (CaCo)."""
    g = p.add_argument_group("engine (this repository)")
    small.add_dataset_args(g, dataset_flag=dataset_flag)
    g.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None,
                   help=f"checkpoints, logs, TensorBoard (None: {output_default}, as the official script)")
    g.add_argument("--use_fp16", "--use-fp16", dest="use_fp16", type=D.str2bool, nargs="?", const=True,
                   default=fp16_default, help="fp16 autocast + GradScaler on CUDA (apex O1's meaning); fp32 on CPU (true/false)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA (no loss scaling)")
    g.add_argument("--channels_last", action="store_true", help="channels_last memory format")
    g.add_argument("--auto_resume", type=D.str2bool, default=True,
                   help="resume from the newest checkpoint in the output directory (true/false)")
    g.add_argument("--knn_freq", type=int, default=0,
                   help=f"kNN monitor every N epochs: bank {knn_root}/train, queries {knn_root}/val (--dataset "
                        "cifar10/...: the train and test splits) (0: off)")
    g.add_argument("--knn_k", type=int, default=20, help="kNN monitor: neighbours")
    g.add_argument("--knn_t", type=float, default=0.2, help="kNN monitor: temperature of the exp(s/t) vote weights")
    g.add_argument("--knn_batch_size", type=int, default=256, help="kNN monitor: feature-extraction batch per process")
    small.add_knn_protocol_arg(g)
    g.add_argument("--image_size", type=int, default=224,
                   help="crop size in px (224 for ImageNet; e.g. 32 for 32-px images; larger than the images "
                        "upsamples them, with a warning)")
    g.add_argument("--cifar_stem", action="store_true", help="3x3 stride-1 ResNet stem without max-pool")
    g.add_argument("--max_iters", type=int, default=None, help="iterations per epoch cap (smoke tests; None: no cap)")
    g.add_argument("--data_seed", type=int, default=0, help="seed of the data order and augmentations")
    g.add_argument("--data_on_device", action="store_true",
                   help="small in-memory datasets (CIFAR, STL-10): keep the uint8 images on the device and run the "
                        "augmentations there, batched (no loader workers; same augmentation distributions)")
    g.add_argument("--fast_aug", choices=("auto", "on", "off"), default="auto",
                   help="images read from files: loader workers only decode, crop and flip (uint8); colour jitter, "
                        "grayscale, blur, solarize and normalisation run batched on the device (same distributions "
                        "as the PIL reference). auto: on with a GPU; off: the classic PIL pipeline in the workers")
    g.add_argument("--stop_check_every", type=positive_int, default=10,
                   help="iterations between two polls for a stop signal (SIGTERM/SIGUSR1; a host-side all-reduce)")
    g.add_argument("--requeue", action="store_true",
                   help="under SLURM: after a stop by signal writes its checkpoint, `scontrol requeue $SLURM_JOB_ID` "
                        "(pair with #SBATCH --signal=USR1@120 and --requeue); the requeued job auto-resumes")
    g.add_argument("--skip_nonfinite", type=nonnegative_int, default=0, metavar="N",
                   help="skip up to N optimisation steps whose loss is non-finite (logged; one flag all-reduce per "
                        "step) instead of stopping at the first (0)")


def engine_config(args: argparse.Namespace, *, batch_size: int, output_dir: str, checkpoint: CheckpointPolicy,
                  method_name: str, workers: int) -> EngineConfig:
    """The :class:`EngineConfig` of a pretraining run: the method-specific parts are given, the
    engine flags of :func:`add_engine_args` (and ``--epochs --print-freq --resume``) come from ``args``."""
    return EngineConfig(epochs=args.epochs, batch_size=batch_size, output_dir=output_dir, checkpoint=checkpoint,
                        method_name=method_name, arch=args.arch, args=vars(args), workers=workers,
                        print_freq=args.print_freq, amp=amp_mode(args), channels_last=args.channels_last,
                        resume=args.resume or None, auto_resume=args.auto_resume, seed=args.data_seed,
                        knn_freq=args.knn_freq, max_iters=args.max_iters, stop_check_every=args.stop_check_every,
                        skip_nonfinite=args.skip_nonfinite, requeue=args.requeue,
                        start_epoch=getattr(args, "start_epoch", 0),
                        data_on_device=getattr(args, "data_on_device", False),
                        fast_aug=getattr(args, "fast_aug", "auto"))


def amp_mode(args: argparse.Namespace) -> str | None:
    return "bf16" if getattr(args, "bf16", False) else ("fp16" if getattr(args, "use_fp16", False) else None)


def resolve_data_arg(args: argparse.Namespace) -> str:
    """The evaluation scripts take the data root as ``DIR``, ``--data`` or ``--data_path``
    (``args.data`` / ``args.data_opt``); set ``args.data`` to the one given."""
    if args.data and args.data_opt and os.path.abspath(args.data) != os.path.abspath(args.data_opt):
        raise UserError(f"two data directories given: {args.data} and {args.data_opt}")
    args.data = args.data or args.data_opt
    if not args.data:
        raise UserError("no data directory: give DIR, --data or --data_path")
    return args.data


def train_dir(data: str, sub: str = "train") -> str:
    """``<data>/train`` (clear one-line errors for a missing or empty directory)."""
    if not data or not os.path.isdir(data):
        raise UserError(f"data directory not found: {data}")
    path = os.path.join(data, sub)
    if not os.path.isdir(path):
        raise UserError(f"{data} has no '{sub}' folder (expected {data}/{sub}/<class>/<image>)")
    find_classes(path)
    return path


def prepare_data(args: argparse.Namespace, root: str, sub: str | None = "train") -> None:
    """Before any process is spawned: check the data (a folder needs ``<root>/<sub>/<class>/<image>``,
    ``sub=None`` when ``root`` is the train folder itself; a small dataset its files) and apply the
    small-image preset and the kNN protocol to ``args`` (:func:`src.data.small.apply_presets`)."""
    folder = None
    if not small.is_small_dataset(args):
        folder = train_dir(root, sub) if sub else root
        if not sub:
            find_classes(root)
    small.apply_presets(args, root, folder)


def knn_monitor(args: argparse.Namespace, data_root: str, std=None, num_classes: int | None = None,
                train_list: str | None = None, val_list: str | None = None, workers: int = 4,
                pick_first: float | None = None, **monitor_kw) -> KnnMonitor | None:
    """The kNN monitor: bank = ``<data>/train`` (eval transform), queries = ``<data>/val``, each
    optionally restricted to the first ``num_classes`` folders or to a file list; ``pick_first``
    keeps the first fraction of every bank class (CaCo: 0.2); ``workers``: the training loader's
    workers of one process (each script passes its own, so ``-j 0`` means no worker here too). With ``--dataset cifar10|cifar100|stl10``
    the bank is the train split and the queries the test split (the small-image preset's eval
    transform). ``monitor_kw`` (``schedule``, ``check``, ``batch_size`` per process, default
    ``--knn_batch_size``) go to :class:`KnnMonitor`."""
    if not args.knn_freq and monitor_kw.get("schedule") is None:
        return None
    monitor_kw.setdefault("batch_size", args.knn_batch_size)
    tf = small.eval_tf(args, std)
    if small.is_small_dataset(args):
        if pick_first is not None:
            log.info("kNN monitor on --dataset %s: the bank is the whole train split (no per-class fraction)",
                     small.dataset_name(args))
        bank, queries = small.knn_splits(args, data_root, tf)
        return KnnMonitor(bank, queries, len(bank.classes), k=args.knn_k, t=args.knn_t, workers=workers, **monitor_kw)
    val = os.path.join(data_root, "val")
    if not os.path.isdir(val):
        log.warning("--knn_freq set but %s does not exist: kNN monitor disabled", val)
        return None
    if train_list and not val_list:
        raise UserError("--knn_freq with --train_list needs --val_list")
    n = None if train_list else num_classes
    bank = ImageDataset(os.path.join(data_root, "train"), tf, file_list=train_list, num_classes=n,
                        pick_first=pick_first)
    queries = ImageDataset(val, tf, file_list=val_list, num_classes=n)
    if queries.classes != bank.classes:
        what = f"{train_list} and {val_list} list" if train_list else f"{val} and {data_root}/train have"
        raise UserError(f"{what} different classes")
    return KnnMonitor(bank, queries, len(bank.classes), k=args.knn_k, t=args.knn_t, workers=workers, **monitor_kw)


def per_process(total: int, info: D.DistInfo, what: str = "batch size") -> int:
    """MoCo semantics: ``-b`` is the batch of one node, split over its processes."""
    n = info.local_world_size if info.distributed else 1
    if total % n:
        raise UserError(f"{what} {total} is not divisible by the {n} processes of this node")
    return total // n


def workers_per_process(workers: int, info: D.DistInfo) -> int:
    """MoCo semantics: ``-j`` is the loader workers of one node, split over its processes (rounded up)."""
    n = max(info.local_world_size, 1)
    return (workers + n - 1) // n


def moco_two_crops(args: argparse.Namespace):
    """``TwoCropsTransform`` of MoCo v2's ``--aug-plus`` augmentation, else MoCo v1's (main_moco, main_disco,
    main_pcl), under the small-image preset when it is in force."""
    from .data.transforms import TwoCropsTransform, moco_v1_augmentation, moco_v2_augmentation
    aug = moco_v2_augmentation if args.aug_plus else moco_v1_augmentation
    return TwoCropsTransform(aug(args.image_size, **small.aug_kwargs(args)))


def print_setup(info: D.DistInfo, per_proc_batch: int, lr_desc: str, schedule: str) -> None:
    log.info("processes %d (device %s) | batch %d per process, %d global | %s | schedule: %s",
             info.world_size, info.device, per_proc_batch, per_proc_batch * info.world_size, lr_desc, schedule)
