"""The fast data path for datasets read from files: loader workers decode, crop and flip only;
colour jitter, grayscale, blur, solarize and normalisation run batched on the device.

Multi-crop SSL is bound by CPU-side augmentation: the reference (PIL) SwAV/LORAC pipeline runs the
colour ops and the blur on each of its 8 crops in the worker. Here the reference transform of the
method (the one its script builds, whatever its preset) is split by
:meth:`~src.data.gpu_pipeline.DevicePipeline.split` into

- :class:`WorkerCrops`, the worker half: per image and per view the crop box and the flip drawn from
  the device pipeline's own random numbers (``uniform(augmentation_seed(seed, epoch, index), ·,
  stream=view)``), applied to the decoded image as one uint8 tensor with torch's antialiased bilinear
  resampling (PIL's filter, the reference's; equal to PIL's ``crop`` + ``resize`` within one grey
  level, and 1.5–4× faster thanks to its uint8 SIMD kernels), returned as ``uint8 3×h×w`` tensors
  (4× less to pin and copy than floats);
- the device half, the engine's ``batch_transform``: every other op with the same random numbers,
  per image, with the reference's probabilities, ranges and order (the flip commutes with them).

An image's augmentation is therefore a function of (seed, epoch, index, view) only, as on the
reference path, but drawn from other random numbers: the two paths have the same distributions, not
the same pixels (``tests/test_fast_path.py``).

JPEG DCT-domain downscaling (PIL's ``draft``) is deliberately not used: it only pays when the
smallest crop a preset can draw still has more pixels than the output, and for ImageNet-sized
images (~400×350) with the presets' minimum scales (0.2 at 224 px for MoCo v2, 0.14 at 224 and 0.05
at 96 for multi-crop) it never does, so it would change the pixels of the crops for no speed.

Selected by ``--fast_aug {auto,on,off}`` (:func:`install`): ``auto`` (default) is on when the
training device is a GPU, ``off`` keeps the classic PIL path, the reference.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from . import gpu_aug as G
from .device_transforms import uniform
from .gpu_pipeline import DevicePipeline, device_pipeline

log = logging.getLogger(__name__)
MODES = ("auto", "on", "off")


class WorkerCrops:
    """The worker half: ``crops = WorkerCrops(geometry)(img, seed)`` → one ``uint8 3×h×w`` tensor per
    view. ``takes_seed``: :class:`~src.data.datasets.ImageDataset` hands it the image's augmentation
    seed instead of seeding the global RNGs."""
    takes_seed = True

    def __init__(self, geometry: DevicePipeline):
        self.views = []  # (stream, [(op, offset)]: the crop, then the flip if any)
        for v in geometry.views:
            kinds = [type(op) for op in v.ops]
            if kinds not in ([G.RandomResizedCrop], [G.RandomResizedCrop, G.HorizontalFlip]):
                raise UserError(f"fast data path: a view must be one crop and at most one flip, got {v.describe()}")
            self.views.append((v.stream, list(zip(v.ops, v.offsets))))
        self.draws = max(max(v.draws, 1) for v in geometry.views)
        self.streams = torch.tensor([[s] for s, _ in self.views], dtype=torch.int64)
        groups: dict[tuple, list[int]] = {}   # views whose crop op and offsets agree: one vectorised draw
        for i, (_, ops) in enumerate(self.views):
            groups.setdefault(tuple((op.describe(), o) for op, o in ops), []).append(i)
        self.groups = [(self.views[idx[0]][1], idx) for idx in groups.values()]

    def __call__(self, img: Image.Image, seed: int | None = None) -> list[torch.Tensor]:
        if seed is None:  # outside the training sampler (no epoch): a fresh draw
            seed = int(torch.randint(0, 2 ** 62, ()).item())
        # the draws of every view at once: row v = uniform(seed, ·, stream_v), as the device pipeline draws them
        u = uniform(torch.full((len(self.views),), seed, dtype=torch.int64), self.draws, self.streams)
        shape = (1, 3, img.height, img.width)
        boxes: list = [None] * len(self.views)
        for ((crop, o), *flip), idx in self.groups:
            rows = u[idx]
            p = crop.params(rows[:, o:o + crop.draws], shape)
            flipped = flip[0][0].params(rows[:, flip[0][1]:flip[0][1] + 1], shape)["applied"].tolist() if flip \
                else [False] * len(idx)
            for i, t, left, h, w, f in zip(idx, p["top"].tolist(), p["left"].tolist(), p["height"].tolist(),
                                        p["width"].tolist(), flipped):
                boxes[i] = (t, left, h, w, f, crop.size)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[None]   # 1×3×H×W, HWC in memory
        out = []
        for t, left, h, w, f, size in boxes:
            v = torch.nn.functional.interpolate(x[:, :, t:t + h, left:left + w], size=size, mode="bilinear",
                                                antialias=True, align_corners=False)[0]
            out.append(v.flip(-1) if f else v)
        return out

    def __repr__(self) -> str:
        return f"WorkerCrops({[[op.describe() for op, _ in ops] for _, ops in self.views]})"


def split_transform(transform) -> tuple[WorkerCrops, DevicePipeline]:
    """(worker half, device half) of a reference transform (UserError if it has no device twin); a
    transform already split (a dataset handed to a second Trainer) gives its halves again."""
    if isinstance(transform, WorkerCrops):
        return transform, transform.device_half
    geometry, photometry = device_pipeline(transform).split()
    worker = WorkerCrops(geometry)
    worker.device_half = photometry
    return worker, photometry


def enabled(mode: str, device: torch.device) -> bool:
    if mode not in MODES:
        raise UserError(f"--fast_aug must be one of {', '.join(MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def install(train_set, mode: str, device: torch.device):
    """Switch ``train_set`` to the fast path when ``mode`` asks for it on ``device``: its transform
    becomes the worker half; returns the device half (the Trainer's ``batch_transform``), or None
    (reference path kept). ``auto`` keeps the reference, with one log line, for a transform that has
    no device twin; ``on`` refuses it with one line."""
    if not enabled(mode, device) or getattr(train_set, "transform", None) is None:
        return None
    try:
        worker, photometry = split_transform(train_set.transform)
    except UserError as e:
        if mode == "on":
            raise UserError(f"--fast_aug on: {e}") from None
        log.info("fast data path off (%s): the reference PIL augmentations run in the loader workers", e)
        return None
    train_set.transform = worker
    log.info("fast data path: loader workers decode, crop and flip (uint8); colour, grayscale, blur, solarize and "
             "normalisation run batched on %s", device)
    return photometry
