"""Linear-probe recipes of the six papers (``eval_linear.py --protocol``), and how flags override them.

=========  ======  ===================  ==========  ================================  ======  =====  =========  =====
protocol   lr      ``-b`` means         lr scaling  schedule (per epoch)              epochs  wd     optimizer  std
=========  ======  ===================  ==========  ================================  ======  =====  =========  =====
moco       30      256 per node         none        x0.1 at [60, 80]                  100     0      SGD        0.229
disco      3.0     256 per node         none        x0.5 at [5,10,...,45,60,80]       100     0      SGD        0.229
disco_semi 3.0     256 per node         none        x0.5 at [60, 80]                  100     0      SGD        0.229
pcl        5       256 per node         none        x0.1 at [60, 80]                  100     0      SGD        0.229
lorac      6.0     512 per process      none        step x0.1 at [60, 80] | cosine    100     0      SGD        0.228
swav       0.3     32 per process       none        cosine (step x0.1 at [60, 80])    100     1e-6   SGD        0.228
sogclr     0.1     1024 global          x B/256     cosine                            90      0      SGD        0.229
caco       0.025   4096 per node        x B/256     cosine                            100     0      LARC-SGD   0.229
=========  ======  ===================  ==========  ================================  ======  =====  =========  =====

Sources: moco_m_lorac.md §6 (LORAC/SwAV ``eval_linear.py``, README values), §7 (MoCo ``main_lincls.py``);
sogclr_caco.md A7 (SogCLR ``lincls.py``), B7 (CaCo ``linear.py``, README ``--lr 0.025 -b 4096`` = 0.4;
the script's own default ``--lr`` is 0.1); disco_pcl_evals.md C2 (DisCo Reproduction lr 3, PCL lr 5), C4
(CIFAR transfer: constant lr 3, 200 epochs, batch 256 — applied on top of any protocol by
``--dataset cifar10|cifar100|stl10``). All use momentum 0.9 and the frozen backbone in eval mode.

"per node" (MoCo semantics): ``-b`` is split over the processes of one node; "per process" (SwAV
``--batch_size``): each process takes ``-b``; "global" (MoCo v3/SogCLR): ``-b`` is split over all processes.
The scaled lr is ``--lr × b / 256`` with ``b`` the ``-b`` value, as the official scripts do.

Without ``--protocol`` the protocol is inferred from the seed command's spelling (printed at start):
``--id`` → pcl; ``--data_name``/``--save_dir`` → sogclr; ``--data_path`` → swav when ``--pretrained``
is a SwAV checkpoint (it holds ``prototypes.weight``: ours or the official ones; swav.md §4), else lorac; ``--data`` → caco;
``--learning-rate`` (the spelling of DisCo's README; MoCo's uses ``--lr``) → disco; otherwise moco
(MoCo ``main_lincls.py`` defaults). DisCo with ``--train_list`` (``main_lincls_semi.py``, C3) steps ×0.5
at [60, 80] instead of the 11 milestones; ``--protocol disco_semi`` is that recipe for a subset folder
built by ``scripts/make_imagenet_fraction.py`` (DisCo ``main_lincls_semi.py``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from ..errors import UserError
from ..data.transforms import IMAGENET_STD, SWAV_STD

DISCO_MILESTONES = [5, 10, 15, 20, 25, 30, 35, 40, 45, 60, 80]
DISCO_SEMI_MILESTONES = (60, 80)


@dataclass(frozen=True)
class Preset:
    lr: float
    batch_size: int
    batch_semantics: str            # "per_node" | "per_process" | "global"
    lr_scaling: str                 # "none" | "linear" (× b/256)
    scheduler: str                  # "step" | "cosine" | "constant"
    milestones: tuple[int, ...] = (60, 80)
    gamma: float = 0.1
    epochs: int = 100
    wd: float = 0.0
    optimizer: str = "sgd"          # "sgd" | "larc"
    std: tuple[float, float, float] = IMAGENET_STD
    workers: int = 32               # official default (per node, or per process for lorac)
    val_batch_size: int = 256


PRESETS: dict[str, Preset] = {
    "moco": Preset(30.0, 256, "per_node", "none", "step", (60, 80), 0.1),
    "disco": Preset(3.0, 256, "per_node", "none", "step", tuple(DISCO_MILESTONES), 0.5),
    "disco_semi": Preset(3.0, 256, "per_node", "none", "step", DISCO_SEMI_MILESTONES, 0.5),
    "pcl": Preset(5.0, 256, "per_node", "none", "step", (60, 80), 0.1),
    "lorac": Preset(6.0, 512, "per_process", "none", "step", (60, 80), 0.1, std=SWAV_STD, workers=10),
    # SwAV eval_linear.py defaults (swav.md §4): the DisCo Tab5 evaluation command passes no optimisation flag
    "swav": Preset(0.3, 32, "per_process", "none", "cosine", (60, 80), 0.1, wd=1e-6, std=SWAV_STD, workers=10),
    "sogclr": Preset(0.1, 1024, "global", "linear", "cosine", epochs=90),
    "caco": Preset(0.025, 4096, "per_node", "linear", "cosine", optimizer="larc"),
}
#: DisCo ``moco/cifar_main_lincls.py`` Reproduction (disco_pcl_evals.md C4), laid over any protocol.
CIFAR_OVERLAY = dict(lr=3.0, batch_size=256, batch_semantics="per_node", lr_scaling="none", scheduler="constant",
                     milestones=(), epochs=200, wd=0.0)


def used_options(argv: list[str]) -> set[str]:
    """Option strings present on the command line (``--lr=3`` counts as ``--lr``)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("-") and a != "-"}


def is_swav_checkpoint(path: str) -> bool:
    """A SwAV / DisCo+SwAV pretraining checkpoint: its state dict holds the prototypes."""
    import os
    if not path or not os.path.isfile(path):
        return False
    from ..checkpoint import extract_state_dict, load_checkpoint
    try:
        sd = extract_state_dict(load_checkpoint(path))
    except UserError:
        return False
    return any(k.split(".")[-2:] == ["prototypes", "weight"] for k in sd)


def infer_protocol(args: argparse.Namespace, opts: set[str]) -> tuple[str, str]:
    """(protocol, reason) from the seed command's spelling; see the module docstring."""
    if args.protocol:
        return args.protocol, "--protocol"
    if "--id" in opts:
        return "pcl", "--id (PCL eval_cls_imagenet.py)"
    if opts & {"--data_name", "--save_dir"}:
        return "sogclr", "--data_name/--save_dir (SogCLR lincls.py)"
    if "--data_path" in opts:
        if is_swav_checkpoint(getattr(args, "pretrained", "")):
            return "swav", "--data_path and a SwAV checkpoint (SwAV eval_linear.py)"
        return "lorac", "--data_path (LORAC/SwAV eval_linear.py)"
    if "--data" in opts:
        return "caco", "--data (CaCo linear.py)"
    if "--learning-rate" in opts:
        return "disco", "--learning-rate (DisCo main_lincls.py; MoCo's README spells it --lr)"
    return "moco", "default (MoCo main_lincls.py)"


@dataclass
class Recipe:
    """The effective settings of one run (after preset, overlay and explicit flags)."""
    protocol: str
    base_lr: float
    lr: float                       # after scaling
    batch_size: int                 # the -b value
    batch_semantics: str
    per_process_batch: int
    global_batch: int
    scheduler: str
    milestones: list[int]
    gamma: float
    final_lr: float
    epochs: int
    wd: float
    momentum: float
    nesterov: bool
    optimizer: str
    std: tuple[float, float, float]
    workers: int                    # per process
    val_batch_size: int             # per process
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.scheduler == "step":
            sched = f"step x{self.gamma} at {self.milestones}"
        elif self.scheduler == "cosine":
            sched = f"cosine per epoch to {self.final_lr}"
        else:
            sched = "constant"
        scale = f" (= {self.base_lr} x {self.batch_size}/256)" if self.lr != self.base_lr else ""
        return (f"protocol {self.protocol}: lr {self.lr:g}{scale}, batch {self.per_process_batch}/process "
                f"{self.global_batch} global ({self.batch_semantics.replace('_', ' ')}), {sched}, "
                f"{self.epochs} epochs, wd {self.wd:g}, {self.optimizer.upper()} momentum {self.momentum}"
                f"{' nesterov' if self.nesterov else ''}, std {self.std[0]}")


def _pick(flag, default):
    return default if flag is None else flag


def resolve_recipe(args: argparse.Namespace, protocol: str, world_size: int = 1,
                   local_world_size: int = 1) -> Recipe:
    """Preset of ``protocol`` (+ CIFAR overlay), overridden by every flag the user gave (flags
    that default to None in the parser). Raises :class:`UserError` for a batch that does not split."""
    if protocol not in PRESETS:
        raise UserError(f"unknown --protocol {protocol!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[protocol]
    if getattr(args, "dataset", "imagenet") in ("cifar10", "cifar100", "stl10"):
        p = replace(p, **CIFAR_OVERLAY)
    elif protocol == "disco" and getattr(args, "train_list", None):
        p = replace(p, milestones=DISCO_SEMI_MILESTONES)  # main_lincls_semi.py: ×0.5 at [60, 80] (C3)
    sched = p.scheduler
    if getattr(args, "scheduler_type", None):
        sched = args.scheduler_type
    if getattr(args, "cos", False):
        sched = "cosine"
    milestones = list(_pick(args.schedule, p.milestones))
    if args.schedule is not None and not args.scheduler_type and not args.cos:
        sched = "step" if milestones else "constant"
    b = _pick(args.batch_size, p.batch_size)
    if b <= 0:
        raise UserError(f"batch size must be positive (got {b})")
    if p.batch_semantics == "per_process":
        per_proc = b
    else:
        n = local_world_size if p.batch_semantics == "per_node" else world_size
        if b % n:
            what = "processes of this node" if p.batch_semantics == "per_node" else "processes"
            raise UserError(f"batch size {b} is not divisible by the {n} {what} ({protocol} semantics: "
                            f"-b is the {'per-node' if p.batch_semantics == 'per_node' else 'global'} batch)")
        per_proc = b // n
    base_lr = _pick(args.lr, p.lr)
    lr = base_lr * b / 256 if p.lr_scaling == "linear" else base_lr
    workers = _pick(args.workers, p.workers)
    if p.batch_semantics != "per_process":
        workers = (workers + max(local_world_size, 1) - 1) // max(local_world_size, 1)
    std = tuple(args.std) if getattr(args, "std", None) else p.std
    return Recipe(protocol=protocol, base_lr=base_lr, lr=lr, batch_size=b, batch_semantics=p.batch_semantics,
                  per_process_batch=per_proc, global_batch=per_proc * world_size, scheduler=sched,
                  milestones=milestones, gamma=_pick(args.gamma, p.gamma), final_lr=_pick(args.final_lr, 0.0),
                  epochs=_pick(args.epochs, p.epochs), wd=_pick(args.wd, p.wd), momentum=args.momentum,
                  nesterov=bool(args.nesterov), optimizer=_pick(args.optimizer, p.optimizer), std=std,
                  workers=workers, val_batch_size=_pick(args.val_batch_size, p.val_batch_size))
