"""Datasets of the linear probe: an ImageNet-style folder (optionally a file-list subset or the first
N classes) and CIFAR-10/100 (torchvision's python pickle batches), all returning ``(img, target, index)``
and accepting the ``(index, epoch)`` items of :class:`~src.data.datasets.EpochSampler`.

Transforms: ImageNet (moco_m_lorac.md §6, sogclr_caco.md A7/B7, disco_pcl_evals.md C2): train
RandomResizedCrop(size) (scale 0.08-1) + flip, val Resize(size·256/224) + CenterCrop(size).
CIFAR (disco_pcl_evals.md C4): train RandomResizedCrop(size, BICUBIC) + flip, test
Resize(size, BICUBIC) + CenterCrop(size); ImageNet mean/std.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
from typing import Sequence

import numpy as np
from PIL import Image
from torchvision import transforms as T

from ..data.datasets import ImageDataset
from ..data.transforms import eval_transform, linear_train_transform, normalize
from ..errors import UserError

log = logging.getLogger("ssl")


def restrict_classes(ds: ImageDataset, classes: Sequence[str]) -> ImageDataset:
    """Keep only the samples of ``classes`` (by folder name) and relabel them in that order, so that
    val labels match a train set built from a file list or a class subset."""
    cidx = {c: i for i, c in enumerate(classes)}
    missing = [c for c in classes if c not in ds.classes]
    if missing:
        log.warning("%d train classes have no folder in %s (e.g. %s)", len(missing), ds.root, missing[0])
    ds.samples = [(p, cidx[ds.classes[t]]) for p, t in ds.samples if ds.classes[t] in cidx]
    if not ds.samples:
        raise UserError(f"{ds.root} has no images of the training classes")
    ds.classes = list(classes)
    ds.targets = [t for _, t in ds.samples]
    return ds


def imagenet_datasets(root: str, size: int, std, train_list: str | None = None, num_classes: int | None = None,
                      seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """``<root>/train`` (or the ``train_list`` subset) and ``<root>/val`` restricted to the same classes."""
    train = ImageDataset(os.path.join(root, "train"), linear_train_transform(size, std), file_list=train_list,
                         num_classes=None if train_list else num_classes, seed=seed)
    if train_list and num_classes is not None:
        train = restrict_classes(train, train.classes[:num_classes])
    val_dir = os.path.join(root, "val")
    if not os.path.isdir(val_dir):
        raise UserError(f"{root} has no 'val' folder (expected {val_dir}/<class>/<image>)")
    val = restrict_classes(ImageDataset(val_dir, eval_transform(size, std)), train.classes)
    return train, val


# ----------------------------------------------------------------------------- CIFAR
CIFAR_FILES = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                           "batches.meta", b"labels", b"label_names"),
               "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names")}


class CifarDataset(ImageDataset):
    """torchvision's CIFAR-10/100 on-disk format (``<root>/cifar-10-batches-py/data_batch_1`` …, pickled
    dicts with ``b'data'`` N×3072 uint8 and ``b'labels'`` / ``b'fine_labels'``), read without download
    or md5 check, with :class:`ImageDataset`'s seeded augmentation and ``(img, target, index)`` items."""

    def __init__(self, root: str, name: str, train: bool, transform=None, seed: int = 0):
        folder, tr, te, meta, label_key, names_key = CIFAR_FILES[name]
        base = os.path.join(root, folder)
        files = [os.path.join(base, f) for f in (tr if train else te)]
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise UserError(f"{name} not found: {absent[0]} is missing (download it with torchvision."
                            f"datasets.{name.upper()}(root={root!r}, download=True))")
        data, labels = [], []
        for f in files:
            try:
                with open(f, "rb") as fh:
                    d = pickle.load(fh, encoding="bytes")
                data.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(int(x) for x in d[label_key])
            except Exception as e:  # noqa: BLE001
                raise UserError(f"cannot read {f}: {type(e).__name__}: {e}") from e
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)  # N×32×32×3
        self.root, self.transform, self.seed = base, transform, seed
        n_cls = 10 if name == "cifar10" else 100
        self.classes = [str(i) for i in range(n_cls)]
        try:
            with open(os.path.join(base, meta), "rb") as fh:
                self.classes = [c.decode() for c in pickle.load(fh, encoding="bytes")[names_key]]
        except Exception:  # noqa: BLE001 - names are cosmetic
            pass
        self.targets = labels
        self.samples = [(f"{name}[{i}]", t) for i, t in enumerate(labels)]
        self._skipped = multiprocessing.Value("i", 0)

    def _load(self, index: int):
        return Image.fromarray(self.data[index]), self.targets[index]


def cifar_transforms(size: int, std) -> tuple[T.Compose, T.Compose]:
    bic = T.InterpolationMode.BICUBIC
    train = T.Compose([T.RandomResizedCrop(size, interpolation=bic), T.RandomHorizontalFlip(), T.ToTensor(),
                       normalize(std)])
    test = T.Compose([T.Resize(size, interpolation=bic), T.CenterCrop(size), T.ToTensor(), normalize(std)])
    return train, test


def cifar_datasets(root: str, name: str, size: int, std, seed: int = 0) -> tuple[CifarDataset, CifarDataset]:
    if not os.path.isdir(root):
        raise UserError(f"data directory not found: {root}")
    ttf, vtf = cifar_transforms(size, std)
    return CifarDataset(root, name, True, ttf, seed), CifarDataset(root, name, False, vtf, seed)
