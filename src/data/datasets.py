"""Datasets that return ``(crops, target, index)`` and the samplers that feed them.

- :class:`ImageDataset`: an ImageFolder (``<root>/<class>/<image>``), optionally restricted to a
  file list (ImageNet-100, the 1 %/10 % splits) or to the first N classes. ``index`` is the
  position in the sorted sample list, stable across epochs (SogCLR's ``u`` and PCL's cluster
  assignments are keyed by it).
- Corrupt or unreadable images are skipped (the next image is used instead), logged once each
  and counted in :attr:`ImageDataset.num_skipped` (shared with the loader workers).
- Augmentation randomness is a function of ``(seed, epoch, index)`` only: the sampler yields
  ``(index, epoch)`` and ``__getitem__`` seeds ``random``/``numpy``/``torch`` from it. The same
  image gets the same crops whatever the number of workers or processes, and a resumed run
  replays exactly the epochs of an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info

from ..errors import UserError

log = logging.getLogger(__name__)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


def _pil_loader(path: str) -> Image.Image:
    """Any PIL-readable image as 8-bit RGB: grayscale, palette, CMYK and alpha images are converted
    (PIL's own conversions); 16/32-bit integer images (16-bit PNGs) are scaled to 8 bits first, which
    PIL's ``convert`` would clip to white. A truncated or non-image file raises (the caller skips it)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            a = np.asarray(img).astype(np.int64)
            bits = 16 if img.mode.startswith("I;16") or a.max(initial=0) < 65536 else 32
            img = Image.fromarray((np.clip(a, 0, 2 ** bits - 1) >> (bits - 8)).astype(np.uint8), mode="L")
        return img.convert("RGB")


def find_classes(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise UserError(f"data directory not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"no class folders in {root} (expected <root>/<class>/<image>)")
    return classes


def _scan(root: str, classes: Sequence[str]) -> list[tuple[str, int]]:
    samples = []
    for target, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(tuple(e.lower() for e in IMG_EXTENSIONS)):
                    samples.append((os.path.join(dirpath, f), target))
    return samples


def read_file_list(list_path: str, root: str) -> list[tuple[str, str]]:
    """Lines ``<relative path> [label]`` or SimCLR-subset lines ``<wnid>_<id>.JPEG``.
    Returns ``(absolute path, class name)`` pairs; the class is the parent folder (or the file-name
    prefix before ``_`` for SimCLR lists)."""
    if not os.path.isfile(list_path):
        raise UserError(f"file list not found: {list_path}")
    out = []
    with open(list_path) as f:
        for line in f:
            tok = line.strip().split()
            if not tok:
                continue
            rel = tok[0]
            cands = [os.path.join(root, rel)]
            parts = rel.split("/")
            if len(parts) > 2:  # 'train/<wnid>/<file>' relative to the dataset root
                cands.append(os.path.join(root, *parts[-2:]))
            if "/" not in rel:  # SimCLR split: '<wnid>_<n>.JPEG'
                cands.append(os.path.join(root, rel.split("_")[0], rel))
            path = next((p for p in cands if os.path.exists(p)), cands[-1])
            out.append((path, os.path.basename(os.path.dirname(path))))
    if not out:
        raise UserError(f"file list {list_path} is empty")
    return out


def first_fraction_per_class(samples: list[tuple[str, int]], fraction: float) -> list[tuple[str, int]]:
    """The first ``int(n_c · fraction)`` samples (sorted order) of every class c (CaCo's kNN bank,
    ``pick_first=0.2``, sogclr_caco.md B5). The official code counts every directory entry of the
    class folder for n_c; only image files are counted here."""
    if not 0 < fraction <= 1:
        raise UserError(f"pick_first must be in (0, 1], not {fraction}")
    per_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        per_class.setdefault(s[1], []).append(s)
    out = [s for t in sorted(per_class) for s in per_class[t][:int(len(per_class[t]) * fraction)]]
    if not out:
        raise UserError(f"pick_first={fraction} keeps no image (every class has fewer than {1 / fraction:.0f})")
    return out


class ImageDataset(Dataset):
    """ImageFolder returning ``(crops, target, index)``; see the module docstring."""

    def __init__(self, root: str, transform: Callable | None = None, file_list: str | None = None,
                 num_classes: int | None = None, seed: int = 0, pick_first: float | None = None):
        self.root, self.transform, self.seed = root, transform, seed
        if file_list:
            pairs = read_file_list(file_list, root)
            missing = [p for p, _ in pairs if not os.path.exists(p)]
            if missing:
                msg = (f"{len(missing)} of the {len(pairs)} files listed in {file_list} are not under {root} "
                       f"(e.g. {missing[0]})")
                if len(missing) == len(pairs):
                    raise UserError(msg + ": wrong data root?")
                log.warning("%s: they are left out", msg)
                pairs = [pc for pc in pairs if os.path.exists(pc[0])]
            self.classes = sorted({c for _, c in pairs})
            cidx = {c: i for i, c in enumerate(self.classes)}
            self.samples = sorted((p, cidx[c]) for p, c in pairs)
        else:
            classes = find_classes(root)
            if num_classes is not None:
                if len(classes) < num_classes:
                    raise UserError(f"{root} has {len(classes)} class folders, fewer than the {num_classes} asked for")
                classes = classes[:num_classes]
            self.classes = classes
            self.samples = _scan(root, classes)
            empty = sorted(set(classes) - {classes[t] for _, t in self.samples})
            if empty and self.samples:
                log.warning("%d class folder(s) under %s hold no images (%s): they keep their label index but "
                            "contribute no samples", len(empty), root, ", ".join(empty[:5]))
        if not self.samples:
            raise UserError(f"no images found under {root} (extensions: {', '.join(IMG_EXTENSIONS[:6])} ...)")
        if pick_first is not None:
            self.samples = first_fraction_per_class(self.samples, pick_first)
        self.targets = [t for _, t in self.samples]
        self._init_skip_flags()

    def _init_skip_flags(self) -> None:
        # one byte per sample, shared with the loader workers: unreadable files are counted once,
        # logged once and not decoded again
        self._bad = multiprocessing.Array("b", len(self.samples), lock=False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files met so far (by any loader worker)."""
        return int(np.frombuffer(self._bad, dtype=np.int8).sum())

    MAX_SUBSTITUTIONS = 50

    def _load(self, index: int) -> tuple[Image.Image, int]:
        """The image at ``index``; an unreadable one is replaced by the next readable image (its
        own label), logged and counted. ``index`` itself is what the dataset returns, so that
        per-index state (SogCLR's u, PCL's clusters, gathered eval features) stays positional."""
        for attempt in range(min(len(self.samples), self.MAX_SUBSTITUTIONS)):
            j = (index + attempt) % len(self.samples)
            if self._bad[j]:
                continue
            path, target = self.samples[j]
            try:
                return _pil_loader(path), target
            except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this file"
                self._bad[j] = 1
                log.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, str(e)[:120])
        raise UserError(f"{self.MAX_SUBSTITUTIONS} unreadable images in a row from {self.samples[index][0]} on")

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, None)
        index = int(index)
        img, target = self._load(index)
        if self.transform is None:
            return img, target, index
        if epoch is None:
            return self.transform(img), target, index
        return self._seeded_transform(img, epoch, index), target, index

    def _seeded_transform(self, img, epoch: int, index: int):
        s = augmentation_seed(self.seed, epoch, index)
        if getattr(self.transform, "takes_seed", False):   # draws from the seed itself (data/fast_path.py)
            return self.transform(img, s)
        in_main = get_worker_info() is None
        if in_main:  # keep the main process's RNG streams untouched (num_workers=0)
            states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(s)
        np.random.seed(s % (2 ** 32))
        torch.default_generator.manual_seed(s)  # the CPU generator only: CUDA streams stay untouched
        try:
            return self.transform(img)
        finally:
            if in_main:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])


class EpochSampler(Sampler):
    """``torch.utils.data.DistributedSampler``'s order (randperm seeded with ``seed + epoch``,
    padded by repetition, strided by rank), yielding ``(index, epoch)`` for seeded augmentation.

    ``set_epoch(epoch, consumed)`` resumes an epoch after its first ``consumed`` positions of the
    padded permutation. After ``it`` iterations of B images on each of W processes exactly the first
    ``it·B·W`` positions have been read (rank r reads positions r, r+W, ...), so a run resumed with
    another number of processes or batch size splits exactly the unread rest over its processes."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        self.n, self.num_replicas, self.rank, self.shuffle, self.seed = n, num_replicas, rank, shuffle, seed
        self.epoch = 0
        self.consumed = 0  # positions of this epoch's padded permutation already read (by all ranks)
        self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed

    def order(self) -> list[int]:
        """The epoch's padded permutation (length ``total_size``)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        pad = self.total_size - len(idx)
        if pad > 0:
            idx += (idx * math.ceil(pad / len(idx)))[:pad]
        return idx

    def _rest(self) -> list[int]:
        rest = self.order()[self.consumed:]
        pad = -len(rest) % self.num_replicas
        if pad and rest:  # only after a re-map to another world size
            rest += (rest * math.ceil(pad / len(rest)))[:pad]
        return rest

    def indices(self) -> list[int]:
        return self._rest()[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, self.epoch) for i in self.indices()])

    def __len__(self) -> int:
        return len(self._rest()) // self.num_replicas


class ShardSampler(Sampler):
    """Evaluation: rank r reads indices r, r+W, ... exactly once (no padding, no duplicates)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.idx = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def collate_crops(batch):
    """Collate ``(crops, target, index)``: crops become a list of ``B×3×H×W`` tensors."""
    crops, targets, index = zip(*batch)
    if isinstance(crops[0], (list, tuple)):
        views = [torch.stack([c[v] for c in crops]) for v in range(len(crops[0]))]
    else:
        views = torch.stack(crops)
    if torch.is_tensor(targets[0]) and targets[0].ndim:  # multi-label targets: one vector per image
        return views, torch.stack(targets), torch.as_tensor(index)
    return views, torch.as_tensor(targets), torch.as_tensor(index)


def augmentation_seed(seed: int, epoch: int, index):
    """The seed of one image's augmentation in one epoch: a function of (seed, epoch, index) only.
    ``index`` may be an int or an int64 tensor (the device-side batch transforms use the same
    seeds as the CPU path)."""
    base = ((seed * 1_000_003 + epoch) * 1_000_033) % (2 ** 62)
    return (base + index) % (2 ** 62)
