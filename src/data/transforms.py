"""Augmentation presets, each exactly as the official code of its method (see ``specs/``).

Every preset takes ``size`` so that the same recipe runs on small images (tests, the demo); the
RandomResizedCrop scales, jitter strengths, probabilities and order are the methods' own. The
small-image preset (:mod:`src.data.small`, docs/small_images.md) also sets ``min_scale`` (the RRC's
lower bound), ``mean``/``std`` (the dataset's normalisation) and ``blur=False`` (no Gaussian blur at
32 px); their defaults give the official pipelines unchanged.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: SwAV's typo (0.228), kept by LORAC for pretraining and linear evaluation (moco_m_lorac.md §4).
SWAV_STD = (0.228, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with radius ~ U(sigma) (MoCo v2 ``moco/loader.py``); applied through
    ``RandomApply`` when a probability is wanted."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILRandomGaussianBlur:
    """SwAV's blur: coin flip ``rand() <= p``, radius ~ U(0.1, 2) (moco_m_lorac.md §4 step 5)."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if not np.random.rand() <= self.p:  # SwAV's coin flip (numpy), then the radius from ``random``
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarize:
    """PIL ``ImageOps.solarize`` at threshold 128 (CaCo view 2)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img)


def normalize(std: Sequence[float] = IMAGENET_STD, mean: Sequence[float] = IMAGENET_MEAN) -> T.Normalize:
    return T.Normalize(mean=mean, std=std)


class TwoCropsTransform:
    """Two views of one image (MoCo ``TwoCropsTransform``; CaCo's asymmetric variant when the two
    transforms differ). Returns a list so that every method sees ``crops: list[Tensor]``."""

    def __init__(self, t1: Callable, t2: Callable | None = None):
        self.t1, self.t2 = t1, t2 or t1

    def __call__(self, img):
        return [self.t1(img), self.t2(img)]


class MultiCropTransform:
    """SwAV/LORAC multi-crop (moco_m_lorac.md §4): for each resolution group i the same pipeline is
    applied ``nmb_crops[i]`` times with independent randomness:
    RRC(size_i, scale=(min_i, max_i)) → flip → RandomApply(ColorJitter(0.8s,0.8s,0.8s,0.2s), 0.8)
    → gray(0.2) → PIL blur(p=0.5) → ToTensor → Normalize(std 0.228 by default).
    ``jitter`` and ``blur_p`` let CaCo's multi-crop reuse the pipeline (sogclr_caco.md B4); ``blur_p=0``
    leaves the blur out."""

    def __init__(self, size_crops: Sequence[int], nmb_crops: Sequence[int], min_scale_crops: Sequence[float],
                 max_scale_crops: Sequence[float], color_distortion_scale: float = 1.0,
                 std: Sequence[float] = SWAV_STD, jitter: Sequence[float] | None = None, blur_p: float = 0.5,
                 order: str = "swav", mean: Sequence[float] = IMAGENET_MEAN):
        n = len(size_crops)
        if not (len(nmb_crops) == len(min_scale_crops) == len(max_scale_crops) == n):
            raise ValueError("--size_crops, --nmb_crops, --min_scale_crops and --max_scale_crops "
                             f"must have the same length (got {len(size_crops)}, {len(nmb_crops)}, "
                             f"{len(min_scale_crops)}, {len(max_scale_crops)})")
        s = color_distortion_scale
        jitter = tuple(jitter) if jitter is not None else (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        self.trans: list[Callable] = []
        for i in range(n):
            crop = T.RandomResizedCrop(size_crops[i], scale=(min_scale_crops[i], max_scale_crops[i]))
            color = [T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2)]
            if blur_p > 0:
                color.append(PILRandomGaussianBlur(p=blur_p))
            if order == "swav":      # crop → flip → colour → blur
                ops = [crop, T.RandomHorizontalFlip(p=0.5), *color]
            else:                    # CaCo: crop → colour → blur → flip
                ops = [crop, *color, T.RandomHorizontalFlip(p=0.5)]
            t = T.Compose([*ops, T.ToTensor(), normalize(std, mean)])
            self.trans.extend([t] * nmb_crops[i])

    def __call__(self, img):
        return [t(img) for t in self.trans]


# ----------------------------------------------------------------------------- presets
def _blur(p: float, on: bool) -> list:
    """``RandomApply([GaussianBlur σ~U(0.1, 2)], p)``; nothing when ``on`` is False (small images)."""
    return [T.RandomApply([GaussianBlur((0.1, 2.0))], p=p)] if on else []


def moco_v1_augmentation(size: int = 224, min_scale: float = 0.2, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD, blur: bool = True) -> T.Compose:
    """MoCo v1 / PCL v1: RRC(0.2,1) → gray(0.2) → ColorJitter(0.4,0.4,0.4,0.4) → flip (std 0.229).
    No blur in v1 (``blur`` is accepted so that every preset takes the same options)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomGrayscale(p=0.2),
                      T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip(), T.ToTensor(),
                      normalize(std, mean)])


def moco_v2_augmentation(size: int = 224, min_scale: float = 0.2, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD, blur: bool = True) -> T.Compose:
    """MoCo v2 ``--aug-plus`` (moco_m_lorac.md §7): RRC(0.2,1) → jitter(0.4,0.4,0.4,0.1) p=0.8 →
    gray(0.2) → PIL blur σ~U(0.1,2) p=0.5 → flip → Normalize(std 0.229)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                      *_blur(0.5, blur), T.RandomHorizontalFlip(), T.ToTensor(), normalize(std, mean)])


def sogclr_augmentation(size: int = 224, crop_min: float = 0.08, mean: Sequence[float] = IMAGENET_MEAN,
                        std: Sequence[float] = IMAGENET_STD, blur: bool = True) -> T.Compose:
    """SogCLR (sogclr_caco.md A4): RRC(crop_min,1) → jitter(0.4,0.4,0.2,0.1) p=0.8 → gray 0.2 →
    PIL blur p=1.0 → flip. No solarize. Used identically for both views."""
    return T.Compose([T.RandomResizedCrop(size, scale=(crop_min, 1.0)),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                      *([GaussianBlur((0.1, 2.0))] if blur else []), T.RandomHorizontalFlip(), T.ToTensor(),
                      normalize(std, mean)])


def caco_augmentations(size: int = 224, min_scale: float = 0.2, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD, blur: bool = True) -> tuple[T.Compose, T.Compose]:
    """CaCo single crop (sogclr_caco.md B4): asymmetric views; blur 1.0 / 0.1, solarize 0 / 0.2."""
    def view(blur_p: float, solarize_p: float) -> T.Compose:
        ops = [T.RandomResizedCrop(size, scale=(min_scale, 1.0)),
               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
               *_blur(blur_p, blur)]
        if solarize_p > 0:
            ops.append(T.RandomApply([Solarize()], p=solarize_p))
        return T.Compose([*ops, T.RandomHorizontalFlip(), T.ToTensor(), normalize(std, mean)])
    return view(1.0, 0.0), view(0.1, 0.2)


def caco_multicrop(size_crops: Sequence[int], nmb_crops: Sequence[int], min_scale_crops: Sequence[float],
                   max_scale_crops: Sequence[float], init_size: int = 224, init_min_scale: float = 0.14,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   blur: bool = True) -> MultiCropTransform:
    """CaCo ``Multi_Transform`` (sogclr_caco.md B4): crop 0 = RRC(init_size, (0.14, 1)), then
    ``nmb_crops[i]`` crops RRC(size_crops[i], (min_i, max_i)); every crop: jitter(0.4,0.4,0.4,0.1)
    p=0.8 → gray 0.2 → blur p=0.5 → flip (no solarize), ImageNet std. Crops 0 and 1 go to the
    momentum encoder (keys), all crops to the online encoder."""
    kw = dict(jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5 if blur else 0.0, std=std, mean=mean, order="caco")
    first = MultiCropTransform([init_size], [1], [init_min_scale], [1.0], **kw)
    out = MultiCropTransform(size_crops, nmb_crops, min_scale_crops, max_scale_crops, **kw)
    out.trans = first.trans + out.trans
    return out


def eval_transform(size: int = 224, std: Sequence[float] = IMAGENET_STD, resize: int | None = None,
                   mean: Sequence[float] = IMAGENET_MEAN) -> T.Compose:
    """Resize(256) → CenterCrop(224) (scaled as 256/224 for other sizes) → ToTensor → Normalize.
    ``resize=size``: the whole image at its own size (the small-image preset: CIFAR at 32 px)."""
    resize = resize or int(round(size * 256 / 224))
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), normalize(std, mean)])


def linear_train_transform(size: int = 224, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Linear-probe training: RandomResizedCrop(size) (default scale 0.08-1) + flip."""
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize(std)])
