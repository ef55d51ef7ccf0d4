"""Tiny CIFAR-10/100 and STL-10 files in the official on-disk formats, written byte by byte from
the format descriptions (not through the readers under test).

- CIFAR python batches: pickled dicts, ``b'data'`` N × 3072 uint8 = the 1024 red, then green, then
  blue values of a 32 × 32 image, each plane row-major; ``b'labels'`` (CIFAR-10) or
  ``b'fine_labels'`` (CIFAR-100); names in ``batches.meta`` / ``meta``.
- STL-10 binaries: ``*_X.bin`` N × 3 × 96 × 96 uint8, each channel plane column-major (the values
  of column 0 top to bottom, then column 1, ...); ``*_y.bin`` one uint8 label in 1..10 per image.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """N×32×32×3 → N×3072 in CIFAR's plane order (R plane, G plane, B plane; rows within a plane)."""
    return np.stack([np.concatenate([img[:, :, c].reshape(-1) for c in range(3)]) for img in images])


def write_cifar10(root: str, n_per_batch: int = 4, n_test: int = 8, seed: int = 0) -> dict:
    """Five train batches of ``n_per_batch`` random images and a test batch, written by the repository's
    one CIFAR-10 writer (``src.data.cifar.write_cifar10``, whose layout ``test_procedural_data.py`` checks
    against :func:`_cifar_rows`); returns the images and labels."""
    from src.data.cifar import write_cifar10 as write
    rng = np.random.default_rng(seed)
    out = {"train": ([], []), "test": ([], [])}
    for b in range(6):
        n = n_test if b == 5 else n_per_batch
        out["test" if b == 5 else "train"][0].append(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        out["test" if b == 5 else "train"][1].extend(int((b * n + i) % 10) for i in range(n))
    out = {k: (np.concatenate(v[0]), v[1]) for k, v in out.items()}
    write(root, out["train"], out["test"], CIFAR10_NAMES)
    return out


def write_cifar100(root: str, n_train: int = 12, n_test: int = 6, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base, exist_ok=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({b"data": _cifar_rows(imgs), b"fine_labels": fine, b"coarse_labels": [y // 5 for y in fine]}, f)
        out[name] = (imgs, fine)
    with open(os.path.join(base, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i:03d}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, f)
    return out


def _stl_bytes(images: np.ndarray) -> bytes:
    """N×96×96×3 → the column-major bytes of ``*_X.bin``, value by value."""
    out = bytearray()
    for img in images:
        for c in range(3):
            for col in range(img.shape[1]):
                out += img[:, col, c].tobytes()
    return bytes(out)


def write_stl10(root: str, n_train: int = 6, n_test: int = 4, n_unlabeled: int = 5, seed: int = 2,
                names: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "stl10_binary")
    os.makedirs(base, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        imgs = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        with open(os.path.join(base, f"{split}_X.bin"), "wb") as f:
            f.write(_stl_bytes(imgs))
        labels = None
        if split != "unlabeled":
            labels = [1 + (i * 3 + len(split)) % 10 for i in range(n)]   # 1..10 on disk
            with open(os.path.join(base, f"{split}_y.bin"), "wb") as f:
                f.write(bytes(labels))
        out[split] = (imgs, labels)
    if names:
        with open(os.path.join(base, "class_names.txt"), "w") as f:
            f.writelines(f"{c}\n" for c in ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey",
                                              "ship", "truck"))
    return out
