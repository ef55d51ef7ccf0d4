"""CIFAR-10/100 from torchvision's python-format folders, for pretraining and evaluation alike.

Items follow the dataset contract of :mod:`src.data` — ``(crops, target, index)`` with the
augmentation seeded per (seed, epoch, index) — so the same class feeds ``Trainer`` (give it a
``TwoCropsTransform`` / ``MultiCropTransform``), the kNN monitor and ``eval_linear.py``. Read
locally, never downloaded at run time, no md5 check (a missing file is one clear line).
"""
from __future__ import annotations

import os
import pickle

import numpy as np
from PIL import Image

from ..errors import UserError
from .datasets import ImageDataset

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
        self._init_skip_flags()

    def _load(self, index: int):
        return Image.fromarray(self.data[index]), self.targets[index]
