"""Small-image datasets (``--dataset cifar10|cifar100|stl10``) and the small-image preset.

Every pretraining script accepts ``--dataset {folder,cifar10,cifar100,stl10}``. ``folder`` (the
default) is the ImageNet-style folder of the official commands; the others read the standard local
files under the script's data flag (never downloaded):

========  ===============================  ==============================  =====================
dataset   files under the data root        pretraining split               kNN bank / queries
========  ===============================  ==============================  =====================
cifar10   ``cifar-10-batches-py/``         train (50,000)                  train / test
cifar100  ``cifar-100-python/``            train (50,000)                  train / test
stl10     ``stl10_binary/``                train+unlabeled (105,000)       train (5,000) / test
========  ===============================  ==============================  =====================

The **small-image preset** is in force for these datasets, and for a folder of small images with
``--small_images``. It fills what the command line does not give (``args.explicit_flags``), following
solo-learn's CIFAR configs and lightly's CIFAR-10 benchmark (docs/small_images.md):

- crop size = the images' side (32 px CIFAR, 96 px STL-10; a folder: the median shorter side of a
  few sampled images), unless ``--image_size`` is given;
- multi-crop: when the largest of ``--size_crops`` exceeds that size, every group is scaled by
  size / largest and rounded half up (224/96 → 32/14 at 32 px, 96/41 at 96 px);
- RandomResizedCrop min scale 0.08 for the global crops (solo-learn CIFAR) where the method's own
  value is a constant or a default not given on the command line;
- Gaussian blur off at 32 px or less (lightly's CIFAR-10 benchmark), kept above (solo-learn's STL-10
  and ImageNet-100 pipelines, lightly's Imagenette);
- the dataset's normalisation (solo-learn's values; a folder gets CIFAR-10's) in place of ImageNet's;
- the CIFAR ResNet stem (3×3 stride-1 conv, no max-pool) for ResNets (``--cifar_stem``);
- evaluation images (kNN monitor, PCL's E-step) at their own size: Resize(size) + CenterCrop(size),
  i.e. no 256/224 enlargement.

The preset is stored in ``args.small_preset`` (a plain dict, saved in ``args.json``) by
:func:`apply_presets`, which every script calls before launching its processes.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable

from torch.utils.data import Dataset

from ..errors import UserError
from .cifar import CIFAR_FILES, CifarDataset
from .datasets import ImageDataset
from .stl10 import FOLDER as STL10_FOLDER
from .stl10 import Stl10Dataset, stl10_files
from .transforms import eval_transform

log = logging.getLogger("ssl")

#: native image side of the built-in small datasets
SMALL_DATASETS = {"cifar10": 32, "cifar100": 32, "stl10": 96}
DATASET_CHOICES = ("folder", *SMALL_DATASETS)
#: (mean, std) per dataset, solo-learn's ``MEANS_N_STD``; a folder of small images gets CIFAR-10's
NORMALIZATION = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                 "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                 "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261))}
MIN_SCALE = 0.08      # RandomResizedCrop lower bound of solo-learn's CIFAR configs
BLUR_MAX_OFF = 32     # no Gaussian blur at crops of this size or smaller (lightly's CIFAR-10 benchmark)
LIGHTLY_KNN = {"k": 200, "t": 0.1}   # lightly's benchmark kNN (benchmarks/cifar10_benchmark.py)


# ----------------------------------------------------------------------------- flags
def add_dataset_args(g: argparse._ArgumentGroup, *, dataset_flag: bool = True) -> None:
    """``--dataset`` (unless the script has its own, CaCo) and ``--small_images``."""
    if dataset_flag:
        g.add_argument("--dataset", type=str.lower, default="folder", choices=DATASET_CHOICES,
                       help="folder: the ImageNet-style folder of the data flag; cifar10/cifar100/stl10: the "
                            "standard files under the data flag (cifar-10-batches-py/, cifar-100-python/, "
                            "stl10_binary/), with the small-image preset (docs/small_images.md)")
    g.add_argument("--small_images", action="store_true",
                   help="apply the small-image preset to a folder of small images (crop = image side, CIFAR "
                        "stem, no blur at 32 px, CIFAR-10 mean/std; docs/small_images.md)")


def add_knn_protocol_arg(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--knn_protocol", choices=["default", "lightly"], default="default",
                   help="lightly: lightly's benchmark kNN (k=200, t=0.1 on backbone features; the monitor every "
                        "epoch), unless those flags are given")


def dataset_name(args: argparse.Namespace) -> str:
    """``folder`` or a key of :data:`SMALL_DATASETS` (CaCo's free-form ``--dataset`` run name is a folder)."""
    v = str(getattr(args, "dataset", "folder") or "folder").lower()
    return v if v in SMALL_DATASETS else "folder"


def is_small_dataset(args: argparse.Namespace) -> bool:
    return dataset_name(args) in SMALL_DATASETS


# ----------------------------------------------------------------------------- readers
def check_files(name: str, root: str) -> None:
    """One clear line when ``root`` lacks the files of ``name`` (before any process is spawned)."""
    if not root or not os.path.isdir(root):
        raise UserError(f"data directory not found: {root}")
    if name == "stl10":
        need = [os.path.join(STL10_FOLDER, f) for f in stl10_files("train+unlabeled") + stl10_files("test")]
    else:
        folder, tr, te = CIFAR_FILES[name][:3]
        need = [os.path.join(folder, f) for f in tr + te]
    absent = [f for f in need if not os.path.isfile(os.path.join(root, f))]
    if absent:
        raise UserError(f"--dataset {name}: {os.path.join(root, absent[0])} is missing (the data flag must point "
                        f"at the folder that holds {need[0].split(os.sep)[0]}/; it is never downloaded here)")


def small_split(name: str, root: str, split: str, transform: Callable | None = None, seed: int = 0) -> Dataset:
    """``split``: ``pretrain`` (CIFAR train; STL-10 train+unlabeled, as solo-learn), ``train`` or ``test``."""
    if name == "stl10":
        return Stl10Dataset(root, "train+unlabeled" if split == "pretrain" else split, transform, seed)
    return CifarDataset(root, name, split != "test", transform, seed)


def pretraining_set(args: argparse.Namespace, root: str, transform: Callable, **folder_kw) -> Dataset:
    """The training images: the small dataset's pretraining split, or ``<root>/train`` of a folder
    (``folder_kw``: ``file_list``, ``num_classes`` of :class:`ImageDataset`; ``train_sub=None`` when
    ``root`` is the train folder itself)."""
    name = dataset_name(args)
    if name in SMALL_DATASETS:
        return small_split(name, root, "pretrain", transform, seed=args.data_seed)
    sub = folder_kw.pop("train_sub", "train")
    path = os.path.join(root, sub) if sub else root
    if not os.path.isdir(path):
        raise UserError(f"{root} has no '{sub}' folder (expected {path}/<class>/<image>)")
    return ImageDataset(path, transform, seed=args.data_seed, **folder_kw)


# ----------------------------------------------------------------------------- the preset
def scale_crop_sizes(sizes: list[int], size: int) -> list[int]:
    """Multi-crop sizes for images of side ``size``: unchanged when none exceeds it, else every size ×
    size / max(sizes), rounded half up (at least 1 px): [224, 96] → [32, 14] at 32, [96, 41] at 96."""
    top = max(sizes)
    if top <= size:
        return list(sizes)
    return [max(1, math.floor(s * size / top + 0.5)) for s in sizes]


def _folder_side(folder: str | None) -> int:
    from ..sanity import sample_image_sides
    if not folder:
        raise UserError("--small_images: give --image_size (the side of the images)")
    sides = sample_image_sides(ImageDataset(folder))
    if not sides:
        raise UserError(f"--small_images: no readable image in {folder} to measure; give --image_size")
    return int(sorted(sides)[len(sides) // 2])


def apply_presets(args: argparse.Namespace, root: str, train_folder: str | None = None) -> dict | None:
    """Check the data, apply the small-image preset and the kNN protocol to ``args`` (module docstring).
    ``root``: the data flag; ``train_folder``: the training images of a folder (to measure them for
    ``--small_images`` without ``--image_size``). Returns (and stores in ``args.small_preset``) the preset."""
    given = set(getattr(args, "explicit_flags", []))
    apply_knn_protocol(args, given)
    name = dataset_name(args)
    if name in SMALL_DATASETS:
        check_files(name, root)
    if name == "folder" and not getattr(args, "small_images", False):
        args.small_preset = None
        return None
    side = SMALL_DATASETS.get(name) or (args.image_size if "image_size" in given else _folder_side(train_folder))
    size = args.image_size if "image_size" in given else side
    args.image_size = size
    from ..models.backbones import arch_spec
    stem = arch_spec(args.arch).family == "resnet" if hasattr(args, "arch") else False
    if stem:
        args.cifar_stem = True
    crops = None
    if hasattr(args, "size_crops"):
        args.size_crops = scale_crop_sizes(list(args.size_crops), size)
        if "min_scale_crops" not in given:
            args.min_scale_crops = [MIN_SCALE, *list(args.min_scale_crops)[1:]]
        crops = list(args.size_crops)
    if hasattr(args, "crop_min") and "crop_min" not in given:
        args.crop_min = MIN_SCALE
    mean, std = NORMALIZATION.get(name, NORMALIZATION["cifar10"])
    args.small_preset = {"dataset": name, "size": size, "side": side, "mean": list(mean), "std": list(std),
                         "blur": size > BLUR_MAX_OFF, "min_scale": MIN_SCALE, "cifar_stem": stem, "size_crops": crops}
    return args.small_preset


def apply_knn_protocol(args: argparse.Namespace, given: set[str]) -> None:
    """``--knn_protocol lightly``: k = 200, t = 0.1 (and the monitor every epoch) where not given."""
    if getattr(args, "knn_protocol", "default") != "lightly":
        return
    if hasattr(args, "nb_knn"):     # eval_knn.py
        values = {"nb_knn": [LIGHTLY_KNN["k"]], "temperature": LIGHTLY_KNN["t"]}
    else:                           # the training monitor (a script's --temperature is its loss's)
        values = {"knn_k": LIGHTLY_KNN["k"], "knn_t": LIGHTLY_KNN["t"], "knn_freq": 1}
    for dest, value in values.items():
        if dest not in given:
            setattr(args, dest, value)


def preset_of(args: argparse.Namespace) -> dict | None:
    return getattr(args, "small_preset", None)


def aug_kwargs(args: argparse.Namespace, *, min_scale: bool = True) -> dict:
    """Keyword arguments of the two-crop presets of :mod:`src.data.transforms` under the preset
    (``{}`` without it: the official pipelines)."""
    p = preset_of(args)
    if p is None:
        return {}
    kw = {"mean": tuple(p["mean"]), "std": tuple(p["std"]), "blur": p["blur"]}
    if min_scale:
        kw["min_scale"] = p["min_scale"]
    return kw


def eval_tf(args: argparse.Namespace, std=None):
    """The evaluation transform (kNN bank and queries, PCL's E-step): under the preset the whole image
    at its own size with the dataset's mean/std; otherwise Resize(size·256/224) + CenterCrop(size)."""
    p = preset_of(args)
    if p is None:
        return eval_transform(args.image_size, **({"std": std} if std is not None else {}))
    return eval_transform(args.image_size, tuple(p["std"]), resize=args.image_size, mean=tuple(p["mean"]))


def describe(args: argparse.Namespace) -> str:
    """The one log line naming the data and the preset in force."""
    p = preset_of(args)
    knn = ""
    if getattr(args, "knn_protocol", "default") == "lightly":
        knn = (f" | kNN: lightly protocol (k={getattr(args, 'knn_k', None) or getattr(args, 'nb_knn', '')}, "
               f"t={getattr(args, 'knn_t', None) or getattr(args, 'temperature', '')}, backbone features)")
    if p is None:
        return ("data: ImageNet-style folder; no small-image preset (the official pipelines at "
                f"{args.image_size} px; --dataset cifar10/cifar100/stl10 or --small_images select it){knn}")
    crops = f" (multi-crop {'/'.join(map(str, p['size_crops']))} px)" if p.get("size_crops") else ""
    stem = "CIFAR ResNet stem" if p["cifar_stem"] else f"no CIFAR stem ({getattr(args, 'arch', '?')} is not a ResNet)"
    return (f"small-image preset ({p['dataset']}, {p['side']} px images): crops {p['size']} px{crops}, RRC min "
            f"scale {p['min_scale']} for the global crops, Gaussian blur {'kept' if p['blur'] else 'off'}, mean "
            f"{tuple(p['mean'])} std {tuple(p['std'])}, {stem}, evaluation at {p['size']} px without "
            f"enlargement{knn}")


def knn_splits(args: argparse.Namespace, root: str, transform: Callable) -> tuple[Dataset, Dataset]:
    """kNN bank (train split) and queries (test split) of a small dataset."""
    name = dataset_name(args)
    return small_split(name, root, "train", transform), small_split(name, root, "test", transform)
