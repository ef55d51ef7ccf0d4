"""Device-side pipelines built from the reference (PIL) transforms, and the per-method presets.

:func:`device_pipeline` reads a reference transform — ``TwoCropsTransform``, ``MultiCropTransform``
or a single ``T.Compose`` from :mod:`src.data.transforms` — and builds the same ops with the same
parameters, probabilities and order on the device (:mod:`src.data.gpu_aug`), one
:class:`ViewPipeline` per view. So every method's preset is mirrored by construction, and a preset
changed in ``transforms.py`` (e.g. the small-image ones) changes its device twin with it;
:func:`device_preset` names them.

Randomness: view ``v`` of image ``b`` draws ``uniform(seeds[b], n, stream=v)``, and op ``k`` of the
view reads its own fixed slice of those ``n`` numbers. Seeds are ``augmentation_seed(seed, epoch,
index)``, so an image's augmentation is a function of (seed, epoch, index, view) only: the same on
CPU and CUDA, whatever the batch, the number of processes or a resume.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import transforms as T

from ..errors import UserError
from . import gpu_aug as G
from . import transforms as R
from .device_transforms import uniform

MAX_VIEWS = 125  # uniform(): streams < 126 with < 7919 draws each never share a counter (seeds differ by ≥ 1)


class ViewPipeline:
    """The ops of one view, applied in order to a float batch in [0, 1]; op k reads the uniforms
    ``[offset_k, offset_k + draws_k)`` of stream ``stream``."""

    def __init__(self, ops: Sequence, stream: int, offsets: Sequence[int] | None = None, draws: int | None = None):
        self.ops, self.stream = list(ops), stream
        if offsets is None:
            offsets = [sum(op.draws for op in self.ops[:k]) for k in range(len(self.ops))]
        self.offsets = list(offsets)
        self.draws = draws if draws is not None else sum(op.draws for op in self.ops)

    def describe(self) -> list[tuple]:
        return [op.describe() for op in self.ops]

    def sample(self, seeds: torch.Tensor, x: torch.Tensor) -> list[dict]:
        """Each op's per-image parameters (for a batch shaped like ``x`` at the op's input; the crop
        is the only op that needs the shape)."""
        u = uniform(seeds.to(x.device), max(self.draws, 1), self.stream)
        return [op.params(u[:, o:o + op.draws], x.shape) for op, o in zip(self.ops, self.offsets)]

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        u = uniform(seeds.to(x.device), max(self.draws, 1), self.stream)
        for op, o in zip(self.ops, self.offsets):
            x = op.apply(x, op.params(u[:, o:o + op.draws], x.shape))
        return x

    def subset(self, keep) -> ViewPipeline:
        """The ops for which ``keep(op)`` holds, each with the same random numbers as in ``self``."""
        pairs = [(op, o) for op, o in zip(self.ops, self.offsets) if keep(op)]
        return ViewPipeline([p[0] for p in pairs], self.stream, [p[1] for p in pairs], self.draws)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``B×3×H×W`` (or ``B×H×W×3``) → float in [0, 1]; float input is returned as is."""
    if x.dtype != torch.uint8:
        return x
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.float().div_(255.0)


class DevicePipeline:
    """All views. ``pipeline(images, seeds)``: every view from the same images (uint8 or float);
    ``pipeline(crops, seeds)`` with a list: view v from ``crops[v]`` — the signature of the engine's
    ``batch_transform`` hook, for crops made elsewhere (see :meth:`split`)."""

    def __init__(self, views: Sequence[ViewPipeline]):
        self.views = list(views)

    def describe(self) -> list[list[tuple]]:
        return [v.describe() for v in self.views]

    def __len__(self) -> int:
        return len(self.views)

    def __call__(self, images, seeds: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(images, (list, tuple)):
            if len(images) != len(self.views):
                raise ValueError(f"{len(images)} crops for a pipeline of {len(self.views)} views")
            return [v(to_float(x), seeds) for v, x in zip(self.views, images)]
        x = to_float(images)
        return [v(x, seeds) for v in self.views]

    def split(self) -> tuple[DevicePipeline, DevicePipeline]:
        """(geometry, photometry): the crops and flips, and every other op, with unchanged random
        numbers. The flip commutes with every other op (pointwise colour ops, a symmetric blur with
        symmetric edge handling), so ``photometry(geometry(x))`` equals ``self(x)``: the crops and
        flips can be made elsewhere (e.g. by loader workers) and the rest run batched on the device."""
        geo = (G.RandomResizedCrop, G.HorizontalFlip)
        return (DevicePipeline([v.subset(lambda op: isinstance(op, geo)) for v in self.views]),
                DevicePipeline([v.subset(lambda op: not isinstance(op, geo)) for v in self.views]))


# ----------------------------------------------------------------------------- translation
def _solarize_threshold(t: float) -> float:
    return t / 255.0 if t > 1 else float(t)  # PIL images: thresholds in 0..255


def _single(t, p: float = 1.0, inclusive: bool = True):
    """The device op of one reference op (``None`` for the format conversion ``ToTensor``)."""
    if isinstance(t, T.RandomResizedCrop):
        if t.interpolation != T.InterpolationMode.BILINEAR:
            raise UserError(f"device augmentation: RandomResizedCrop with {t.interpolation.value} "
                            "interpolation has no device equivalent (bilinear only)")
        return G.RandomResizedCrop(t.size, t.scale, t.ratio)
    if isinstance(t, T.RandomHorizontalFlip):
        return G.HorizontalFlip(t.p)
    if isinstance(t, T.ColorJitter):
        return G.ColorJitter(t.brightness, t.contrast, t.saturation, t.hue, p=p)
    if isinstance(t, T.RandomGrayscale):
        return G.Grayscale(t.p)
    if isinstance(t, R.GaussianBlur):
        return G.GaussianBlur(p, t.sigma, inclusive=inclusive)
    if isinstance(t, R.PILRandomGaussianBlur):
        return G.GaussianBlur(t.p, (t.radius_min, t.radius_max), inclusive=True)
    if isinstance(t, T.GaussianBlur):
        return G.GaussianBlur(p, t.sigma, kernel_size=t.kernel_size[0], inclusive=inclusive)
    if isinstance(t, R.Solarize):
        return G.Solarize(p, 128 / 255, inclusive=inclusive)
    if isinstance(t, T.RandomSolarize):
        return G.Solarize(t.p, _solarize_threshold(t.threshold), inclusive=False)
    if isinstance(t, T.Normalize):
        return G.Normalize(t.mean, t.std)
    if isinstance(t, T.ToTensor):
        return None
    if isinstance(t, T.RandomApply):
        if len(t.transforms) != 1:
            raise UserError("device augmentation: RandomApply over several transforms is not supported")
        return _single(t.transforms[0], p=t.p, inclusive=True)
    raise UserError(f"device augmentation: {type(t).__name__} has no device-side equivalent")


def view_ops(transform) -> list:
    """The device ops of one view's reference ``T.Compose``, in its order."""
    ts = transform.transforms if isinstance(transform, T.Compose) else [transform]
    ops = [op for op in (_single(t) for t in ts) if op is not None]
    crops = [op for op in ops if isinstance(op, G.RandomResizedCrop)]
    if len(crops) != 1:
        raise UserError(f"device augmentation: a view needs exactly one RandomResizedCrop (found {len(crops)})")
    return ops


def reference_views(transform) -> list:
    """The per-view transforms of a reference: ``TwoCropsTransform`` → 2, ``MultiCropTransform`` →
    one per crop, a single transform → 1."""
    if isinstance(transform, R.TwoCropsTransform):
        return [transform.t1, transform.t2]
    if isinstance(transform, R.MultiCropTransform):
        return list(transform.trans)
    return [transform]


def device_pipeline(transform) -> DevicePipeline:
    """The device twin of a reference transform (see the module docstring)."""
    views = reference_views(transform)
    if len(views) > MAX_VIEWS:
        raise UserError(f"device augmentation: at most {MAX_VIEWS} views (got {len(views)})")
    return DevicePipeline([ViewPipeline(view_ops(t), stream=v) for v, t in enumerate(views)])


# ----------------------------------------------------------------------------- presets
SWAV_CROPS = {"size_crops": (224, 96), "nmb_crops": (2, 6), "min_scale_crops": (0.14, 0.05), "max_scale_crops": (1.0, 0.14)}


def reference_preset(name: str, size: int = 224, **kw):
    """The reference transform of a method, by name:

    - ``moco_v1`` / ``pcl_v1``: MoCo v1 (two crops); ``moco_v2`` / ``pcl_v2``: MoCo v2 aug-plus;
    - ``sogclr`` (``crop_min``); ``caco``: CaCo's asymmetric single-crop views;
    - ``caco_multicrop`` (``size_crops``, ``nmb_crops``, ``min_scale_crops``, ``max_scale_crops``,
      ``init_size`` = ``size``); ``swav`` / ``mocom`` / ``lorac``: SwAV multi-crop (same keys and
      ``color_distortion_scale``; default 2×224 + 6×96 at SwAV's scales)."""
    crops = {k: kw.pop(k, v) for k, v in SWAV_CROPS.items()} if name in ("swav", "mocom", "lorac",
                                                                          "caco_multicrop") else {}
    builders = {
        "moco_v1": lambda: R.TwoCropsTransform(R.moco_v1_augmentation(size)),
        "moco_v2": lambda: R.TwoCropsTransform(R.moco_v2_augmentation(size)),
        "sogclr": lambda: R.TwoCropsTransform(R.sogclr_augmentation(size, **kw)),
        "caco": lambda: R.TwoCropsTransform(*R.caco_augmentations(size)),
        "caco_multicrop": lambda: R.caco_multicrop(**crops, init_size=size),
        "swav": lambda: R.MultiCropTransform(**crops, **kw),
    }
    aliases = {"pcl_v1": "moco_v1", "pcl_v2": "moco_v2", "mocom": "swav", "lorac": "swav"}
    key = aliases.get(name, name)
    if key not in builders:
        raise UserError(f"unknown augmentation preset {name!r} (known: {', '.join(sorted([*builders, *aliases]))})")
    return builders[key]()


def device_preset(name: str, size: int = 224, **kw) -> DevicePipeline:
    """:func:`device_pipeline` of :func:`reference_preset`."""
    return device_pipeline(reference_preset(name, size, **kw))
