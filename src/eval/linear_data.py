"""Datasets of the linear probe: an ImageNet-style folder (optionally a file-list subset or the first
N classes) and CIFAR-10/100 (torchvision's python pickle batches), all returning ``(img, target, index)``
and accepting the ``(index, epoch)`` items of :class:`~src.data.datasets.EpochSampler`.

Transforms: ImageNet (moco_m_lorac.md §6, sogclr_caco.md A7/B7, disco_pcl_evals.md C2): train
RandomResizedCrop(size) (scale 0.08-1) + flip, val Resize(size·256/224) + CenterCrop(size).
CIFAR (disco_pcl_evals.md C4): train RandomResizedCrop(size, BICUBIC) + flip, test
Resize(size, BICUBIC) + CenterCrop(size); ImageNet mean/std. STL-10 (labelled train → test) takes
the same recipe. The readers are the pretraining ones (:mod:`src.data.small`).
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

from torchvision import transforms as T

from ..data.cifar import CIFAR_FILES, CifarDataset  # noqa: F401 (re-exported)
from ..data.datasets import ImageDataset
from ..data.small import small_split
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
    ds._init_skip_flags()   # one flag per (new) sample
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
def cifar_transforms(size: int, std) -> tuple[T.Compose, T.Compose]:
    bic = T.InterpolationMode.BICUBIC
    train = T.Compose([T.RandomResizedCrop(size, interpolation=bic), T.RandomHorizontalFlip(), T.ToTensor(),
                       normalize(std)])
    test = T.Compose([T.Resize(size, interpolation=bic), T.CenterCrop(size), T.ToTensor(), normalize(std)])
    return train, test


def small_datasets(root: str, name: str, size: int, std, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10/100 train → test, or STL-10's labelled train → test, with the C4 transforms."""
    if not os.path.isdir(root):
        raise UserError(f"data directory not found: {root}")
    ttf, vtf = cifar_transforms(size, std)
    return small_split(name, root, "train", ttf, seed), small_split(name, root, "test", vtf, seed)
