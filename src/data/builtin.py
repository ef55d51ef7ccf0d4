"""Small datasets that need no download, written as ImageFolder trees (``<out>/{train,val}/<class>/``).

- :func:`make_digits_folder`: scikit-learn's digits (1,797 8×8 grey images, shipped inside the
  scikit-learn wheel) upsampled to ``size`` px RGB, with a fixed stratified train/val split.
- :func:`make_synthetic_folder`: seeded coloured shapes, one class per (shape, colour) pair,
  for tests and benchmarks.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw


def _write(img: Image.Image, root: str, split: str, cls: str, name: str) -> None:
    d = os.path.join(root, split, cls)
    os.makedirs(d, exist_ok=True)
    img.save(os.path.join(d, name))


def make_digits_folder(out: str, size: int = 32, val_fraction: float = 0.3, seed: int = 0) -> tuple[int, int]:
    """Write sklearn digits as PNGs; returns (n_train, n_val). Idempotent: an existing complete
    tree is kept."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    marker = os.path.join(out, ".complete")
    digits = load_digits()
    idx = np.arange(len(digits.target))
    tr, va = train_test_split(idx, test_size=val_fraction, stratify=digits.target, random_state=seed)
    if os.path.exists(marker):
        return len(tr), len(va)
    for split, ids in (("train", tr), ("val", va)):
        for i in ids:
            a = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(a, "L").resize((size, size), Image.BILINEAR).convert("RGB")
            _write(img, out, split, f"{digits.target[i]}", f"{i:04d}.png")
    open(marker, "w").close()
    return len(tr), len(va)


SHAPES = ("ellipse", "rectangle", "triangle")
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40))


def _shape(rng: np.random.Generator, size: int, shape: str, colour) -> Image.Image:
    bg = tuple(int(c) for c in rng.integers(0, 90, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = int(size * rng.uniform(0.35, 0.7))
    x0, y0 = (int(v) for v in rng.integers(0, size - s + 1, 2))
    col = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
    if shape == "ellipse":
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=col)
    elif shape == "rectangle":
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=col)
    else:
        d.polygon([(x0 + s // 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=col)
    return img


def make_synthetic_folder(out: str, num_classes: int = 4, train_per_class: int = 8, val_per_class: int = 4,
                          size: int = 32, seed: int = 0, splits=("train", "val")) -> str:
    """Coloured shapes; class c is shape ``c % 3`` in colour ``c // 3``. Returns ``out``."""
    rng = np.random.default_rng(seed)
    for split in splits:
        n = train_per_class if split == "train" else val_per_class
        for c in range(num_classes):
            for i in range(n):
                img = _shape(rng, size, SHAPES[c % len(SHAPES)], COLOURS[(c // len(SHAPES)) % len(COLOURS)])
                _write(img, out, split, f"class_{c:03d}", f"img_{i:04d}.png")
    return out
