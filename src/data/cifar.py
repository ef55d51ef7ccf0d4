"""CIFAR-10/100 from torchvision's python-format folders, for pretraining and evaluation alike (and a
CIFAR-10-format writer for generated data, :func:`write_cifar10`).

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


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """N×32×32×3 uint8 → N×3072 in CIFAR's order: the red plane, then green, then blue, each row-major."""
    return np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2)).reshape(len(images), -1)


def write_cifar10(root: str, train: tuple[np.ndarray, list], test: tuple[np.ndarray, list],
                  names: list[str]) -> str:
    """Write ``(images N×32×32×3 uint8, labels)`` splits as ``<root>/cifar-10-batches-py`` in torchvision's
    python format: the train images split in order over ``data_batch_1..5`` (pickled dicts with ``b'data'``,
    ``b'labels'``, ``b'filenames'``, ``b'batch_label'``), ``test_batch``, and ``batches.meta``
    (``b'label_names'``). Returns the folder."""
    base = os.path.join(root, CIFAR_FILES["cifar10"][0])
    os.makedirs(base, exist_ok=True)
    imgs, labels = train
    bounds = np.linspace(0, len(imgs), 6).round().astype(int)
    batches = [(f"data_batch_{b + 1}", imgs[bounds[b]:bounds[b + 1]], labels[bounds[b]:bounds[b + 1]])
               for b in range(5)] + [("test_batch", test[0], test[1])]
    for name, x, y in batches:
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": cifar_rows(x), b"labels": [int(v) for v in y],
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(len(y))]}, f)
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in names], b"num_vis": 3072,
                     b"num_cases_per_batch": int(bounds[1])}, f)
    return base
