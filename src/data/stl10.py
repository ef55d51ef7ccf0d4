"""STL-10 from its binary folder (``<root>/stl10_binary/``), for pretraining and evaluation alike.

The official files (and torchvision's ``STL10``): ``train_X.bin`` / ``test_X.bin`` /
``unlabeled_X.bin`` hold N × 3 × 96 × 96 uint8 images, each channel stored **column-major**
(the bytes of one channel run down the columns, so a row-major read gives the transposed image);
``train_y.bin`` / ``test_y.bin`` hold one uint8 label in 1..10 per image; ``class_names.txt`` one
name per line. 5,000 labelled train, 8,000 test and 100,000 unlabeled images.

Splits: ``train``, ``test``, ``unlabeled`` and ``train+unlabeled`` (the pretraining split of
solo-learn and torchvision: the labelled train images first, then the unlabeled ones, target -1).
The image files are memory-mapped, not loaded: 100,000 unlabeled images are 2.8 GB, and the loader
workers share the page cache instead of each holding a copy. Items follow the dataset contract of
:mod:`src.data` (seeded augmentation per (seed, epoch, index)), as :class:`~src.data.cifar.CifarDataset`.
Read locally, never downloaded (a missing file is one clear line).
"""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
from PIL import Image

from ..errors import UserError
from .datasets import ImageDataset

FOLDER = "stl10_binary"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
SPLITS = {"train": ("train",), "test": ("test",), "unlabeled": ("unlabeled",),
          "train+unlabeled": ("train", "unlabeled")}


def stl10_files(split: str) -> list[str]:
    """The files one split reads (labels only for the labelled parts)."""
    out = []
    for part in SPLITS[split]:
        out.append(f"{part}_X.bin")
        if part != "unlabeled":
            out.append(f"{part}_y.bin")
    return out


class Stl10Dataset(ImageDataset):
    """STL-10's binary format read without download or checksum, with :class:`ImageDataset`'s seeded
    augmentation and ``(img, target, index)`` items; unlabeled images have target -1."""

    def __init__(self, root: str, split: str = "train", transform=None, seed: int = 0):
        if split not in SPLITS:
            raise UserError(f"unknown STL-10 split {split!r}; choose from {', '.join(SPLITS)}")
        base = os.path.join(root, FOLDER)
        absent = [f for f in stl10_files(split) if not os.path.isfile(os.path.join(base, f))]
        if absent:
            raise UserError(f"stl10 not found: {os.path.join(base, absent[0])} is missing (download it with "
                            f"torchvision.datasets.STL10(root={root!r}, split={split!r}, download=True))")
        self.root, self.split, self.transform, self.seed = base, split, transform, seed
        self._parts: list[tuple[str, int]] = []     # (image file, number of images), in split order
        labels: list[int] = []
        for part in SPLITS[split]:
            path = os.path.join(base, f"{part}_X.bin")
            size = os.path.getsize(path)
            if size % IMAGE_BYTES:
                raise UserError(f"cannot read {path}: {size} bytes is not a whole number of 3x96x96 images")
            n = size // IMAGE_BYTES
            if part == "unlabeled":
                labels.extend([-1] * n)
            else:
                y = np.fromfile(os.path.join(base, f"{part}_y.bin"), dtype=np.uint8)
                if len(y) != n or (n and not (1 <= int(y.min()) and int(y.max()) <= 10)):
                    raise UserError(f"cannot read {base}/{part}_y.bin: {len(y)} labels for {n} images "
                                    "(expected one label in 1..10 per image)")
                labels.extend(int(v) - 1 for v in y)
            self._parts.append((path, n))
        self.classes = [str(i) for i in range(1, 11)]
        names = os.path.join(base, "class_names.txt")
        if os.path.isfile(names):
            with open(names) as fh:
                read = [line.strip() for line in fh if line.strip()]
            if len(read) == 10:
                self.classes = read
        self.targets = labels
        self.samples = [(f"stl10-{split}[{i}]", t) for i, t in enumerate(labels)]
        if not self.samples:
            raise UserError(f"{base}: the {split} split holds no image")
        self._maps: list[np.memmap] | None = None
        self._skipped = multiprocessing.Value("i", 0)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None   # re-opened lazily in each loader worker (never pickled as a copy)
        return state

    def image_array(self, index: int) -> np.ndarray:
        """Image ``index`` as a 96 × 96 × 3 uint8 array (row-major, upright)."""
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=np.uint8, mode="r", shape=(n, 3, SIDE, SIDE)) for p, n in self._parts]
        for m, (_, n) in zip(self._maps, self._parts):
            if index < n:
                return np.ascontiguousarray(m[index].transpose(2, 1, 0))   # C×W×H (column-major) → H×W×C
            index -= n
        raise IndexError(index)

    def uint8_images(self) -> np.ndarray:
        """The whole split as one ``N × 96 × 96 × 3`` uint8 array in memory (row-major, upright), for the
        GPU-resident path (``--data_on_device``): train + unlabeled is 105,000 images, 2.9 GB."""
        arrays = [np.fromfile(p, dtype=np.uint8).reshape(n, 3, SIDE, SIDE).transpose(0, 3, 2, 1) for p, n in self._parts]
        return np.ascontiguousarray(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])

    def _load(self, index: int):
        return Image.fromarray(self.image_array(index)), self.targets[index]
