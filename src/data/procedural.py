"""A generated CIFAR-10 stand-in whose classes only an augmentation-invariant encoder can separate.

Each class is a **texture** filling the whole image (so every RandomResizedCrop of it still shows
the class), defined by its geometry alone, and symmetric under a horizontal flip:

==  =====================  ==  ============================
0   horizontal stripes     5   dot lattice
1   vertical stripes       6   square grid of thin lines
2   checkerboard           7   diagonal grid of thin lines
3   diagonal checkerboard  8   isotropic blobs
4   concentric rings       9   horizontal zigzag stripes
==  =====================  ==  ============================

Every image draws its own **nuisances**, which a randomly initialised network sees first: the two
colours of the texture (any hue, any brightness, a minimum contrast between them), a linear
illumination ramp, the period (``period`` px range), phase / centre, a small orientation jitter and
Gaussian pixel noise. Colour is never a cue (colour jitter and grayscale would destroy it) and the
periods stay well above the pixel scale (a full-image crop resized to 16 px keeps ≥ 2.5 px per period).

:func:`write_procedural_cifar10` writes it in torchvision's CIFAR-10 python format (read by
``--dataset cifar10``); seeded and deterministic (one ``numpy`` generator per split).
"""
from __future__ import annotations

import numpy as np

from .cifar import write_cifar10

TEXTURES = ("hstripes", "vstripes", "checker", "diagchecker", "rings", "dots", "grid", "diaggrid", "blobs",
            "zigzag")


def _square(u: np.ndarray) -> np.ndarray:
    """A soft square wave of period 1 in [0, 1] (anti-aliased over about a pixel)."""
    return 0.5 + 0.5 * np.tanh(4.0 * np.sin(2 * np.pi * u))


def _lines(u: np.ndarray, width: float) -> np.ndarray:
    """1 on thin lines at integer ``u`` (``width`` in periods), 0 between them."""
    d = np.abs(u - np.round(u))
    return np.clip((width - d) / 0.08 + 0.5, 0.0, 1.0)


def _blobs(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    """Thresholded low-pass noise whose blobs are about ``period`` px across (no orientation)."""
    f = np.fft.fftfreq(size)
    rad = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    spec = np.exp(-((rad * period - 0.5) ** 2) / 0.08) * (rng.normal(size=(size, size))
                                                         + 1j * rng.normal(size=(size, size)))
    field = np.real(np.fft.ifft2(spec))
    return 0.5 + 0.5 * np.tanh(3.0 * field / (field.std() + 1e-8))


def texture(cls: int, rng: np.random.Generator, size: int, period: tuple[float, float],
            tilt: float = 8.0) -> np.ndarray:
    """The pattern of class ``cls`` (``size``×``size`` in [0, 1]) with random period, phase, centre and
    a ±``tilt``° orientation jitter."""
    p = rng.uniform(*period)
    a = np.deg2rad(rng.uniform(-tilt, tilt))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy = rng.uniform(0, size, 2)
    x0, y0 = xx - cx, yy - cy
    x = (x0 * np.cos(a) - y0 * np.sin(a)) / p
    y = (x0 * np.sin(a) + y0 * np.cos(a)) / p
    name = TEXTURES[cls]
    if name == "hstripes":
        return _square(y)
    if name == "vstripes":
        return _square(x)
    if name == "checker":
        return _square(x) * _square(y) + (1 - _square(x)) * (1 - _square(y))
    if name == "diagchecker":
        u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
        return _square(u) * _square(v) + (1 - _square(u)) * (1 - _square(v))
    if name == "rings":
        return _square(np.sqrt(x ** 2 + y ** 2))
    if name == "dots":
        d = np.sqrt((x - np.round(x)) ** 2 + (y - np.round(y)) ** 2)
        return np.clip((0.3 - d) / 0.08 + 0.5, 0.0, 1.0)
    if name == "grid":
        return np.maximum(_lines(x, 0.12), _lines(y, 0.12))
    if name == "diaggrid":
        return np.maximum(_lines((x + y) / np.sqrt(2), 0.12), _lines((x - y) / np.sqrt(2), 0.12))
    if name == "blobs":
        return _blobs(rng, size, p)
    # zigzag: horizontal stripes displaced by a triangle wave of x (symmetric under a horizontal flip)
    tri = np.abs(2 * (x / 1.5 - np.floor(x / 1.5 + 0.5)))
    return _square(y + 0.6 * tri)


def palettes(n: int, seed: int = 12345, min_contrast: float = 120.0) -> np.ndarray:
    """``n`` colour pairs (n × 2 × 3, 0..255) with at least ``min_contrast`` between the two colours;
    the same for every split and seed, so colour says nothing about the class and little about the image."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.linalg.norm(a - b) >= min_contrast:
            out.append((a, b))
    return np.asarray(out)


def render(cls: int, rng: np.random.Generator, size: int = 32, period: tuple[float, float] = (5.0, 8.0),
           noise: tuple[float, float] = (4.0, 16.0), n_palettes: int = 6) -> np.ndarray:
    """One ``size``×``size``×3 uint8 image of class ``cls`` with its nuisances (module docstring)."""
    f = texture(cls, rng, size, period)[..., None]
    fg, bg = palettes(n_palettes)[rng.integers(n_palettes)][rng.permutation(2)]
    img = bg * (1 - f) + fg * f + rng.uniform(-20, 20, 3)                  # palette, shifted per image
    g = rng.uniform(-1, 1, 2)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    light = rng.uniform(0.6, 1.3) * (1.0 + 0.5 * (g[0] * xx + g[1] * yy))  # brightness, illumination ramp ±25 %
    img = img * light[..., None] + rng.normal(0.0, rng.uniform(*noise), img.shape)   # pixel noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_split(per_class: int, num_classes: int = 10, size: int = 32, seed: int = 0, **kw) -> tuple[np.ndarray, list]:
    """``per_class`` images of each of the first ``num_classes`` textures, classes interleaved
    (image i has class i % num_classes); N×size×size×3 uint8 and the labels."""
    if not 1 <= num_classes <= len(TEXTURES):
        raise ValueError(f"num_classes must be in 1..{len(TEXTURES)}")
    rng = np.random.default_rng(seed)
    labels = [i % num_classes for i in range(per_class * num_classes)]
    return np.stack([render(c, rng, size, **kw) for c in labels]), labels


def write_procedural_cifar10(root: str, train_per_class: int = 500, test_per_class: int = 100,
                             num_classes: int = 10, seed: int = 0, **kw) -> str:
    """The generated dataset under ``<root>/cifar-10-batches-py`` (CIFAR-10 python format; the train
    images split over the five batches). Train and test draw from independent streams of ``seed``.
    Returns ``root``."""
    train = make_split(train_per_class, num_classes, 32, seed=seed * 2 + 0, **kw)
    test = make_split(test_per_class, num_classes, 32, seed=seed * 2 + 1, **kw)
    names = list(TEXTURES[:num_classes]) + [f"unused_{i}" for i in range(num_classes, 10)]
    write_cifar10(root, train, test, names)
    return root


# ----------------------------------------------------------------------------- the learning check
#: the learning check's classes: texture geometry only, each symmetric under a horizontal flip
INVARIANT_CLASSES = ("hstripes", "vstripes", "checker", "dots")
#: its one colour pair (foreground, background)
INVARIANT_COLOURS = ((200.0, 60.0, 40.0), (40.0, 80.0, 160.0))
#: MoCo v2's ColorJitter(0.4, 0.4, 0.4, 0.1): brightness, contrast, saturation factors 1 ± 0.4, hue ± 0.1
JITTER = (0.4, 0.4, 0.4, 0.1)


def render_invariant(cls: int, rng: np.random.Generator, size: int = 32, period: tuple[float, float] = (4.0, 10.0),
                     noise: float = 4.0) -> np.ndarray:
    """One ``size``×``size``×3 uint8 image of ``INVARIANT_CLASSES[cls]`` in which every per-image
    nuisance is one that MoCo v2's augmentation draws afresh for each view, so that the class is the
    only thing two views of an image share beyond what a view of any other image of the class shares.

    The texture fills the image, upright (RandomResizedCrop keeps the class and redraws phase and
    scale; the period, 4–10 px at 32 px, stays inside the crops' zoom range), in one fixed colour
    pair, with a little pixel noise, then through one draw of MoCo v2's own colour jitter (brightness,
    contrast, saturation, hue, in that order, factors from the augmentation's ranges). A randomly
    initialised encoder sees the jitter and the period first; an encoder that has learnt the
    augmentations' invariances sees only the geometry (docs/small_images.md, "The learning check")."""
    import torch
    import torchvision.transforms.v2.functional as F
    f = texture(TEXTURES.index(INVARIANT_CLASSES[cls]), rng, size, period, tilt=0.0)[..., None]
    fg, bg = (np.asarray(c) for c in INVARIANT_COLOURS)
    img = bg * (1 - f) + fg * f + rng.normal(0.0, noise, (size, size, 3))
    x = torch.from_numpy(np.clip(np.round(img), 0, 255).astype(np.uint8)).permute(2, 0, 1)
    b, c, s, h = JITTER
    x = F.adjust_brightness(x, rng.uniform(1 - b, 1 + b))
    x = F.adjust_contrast(x, rng.uniform(1 - c, 1 + c))
    x = F.adjust_saturation(x, rng.uniform(1 - s, 1 + s))
    x = F.adjust_hue(x, rng.uniform(-h, h))
    return x.permute(1, 2, 0).contiguous().numpy()


def write_invariant_cifar10(root: str, train_per_class: int = 128, test_per_class: int = 64, seed: int = 0) -> str:
    """The learning check's data (:func:`render_invariant`, classes interleaved) under
    ``<root>/cifar-10-batches-py`` in CIFAR-10's python format (the unused label names are placeholders).
    Returns ``root``."""
    def split(per_class: int, stream: int) -> tuple[np.ndarray, list]:
        rng = np.random.default_rng(seed * 2 + stream)
        labels = [i % len(INVARIANT_CLASSES) for i in range(per_class * len(INVARIANT_CLASSES))]
        return np.stack([render_invariant(c, rng) for c in labels]), labels
    names = list(INVARIANT_CLASSES) + [f"unused_{i}" for i in range(len(INVARIANT_CLASSES), 10)]
    write_cifar10(root, split(train_per_class, 0), split(test_per_class, 1), names)
    return root
