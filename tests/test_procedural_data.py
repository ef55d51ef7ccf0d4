"""The generated textures dataset (src/data/procedural.py) and the CIFAR-10 writer it shares with the
tests (src/data/cifar.py ``write_cifar10``)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from src.data.cifar import CifarDataset, write_cifar10
from src.data.procedural import INVARIANT_CLASSES, TEXTURES, make_split, write_invariant_cifar10, write_procedural_cifar10
from tests.small_data import _cifar_rows


def test_cifar_writer_layout_matches_the_format_description(tmp_path):
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8), [i % 10 for i in range(7)])
    test = (rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), [9, 8, 7])
    write_cifar10(str(tmp_path), train, test, [f"c{i}" for i in range(10)])
    base = tmp_path / "cifar-10-batches-py"
    got, labels = [], []
    for i in range(1, 6):   # 7 images over 5 batches, in order
        with open(base / f"data_batch_{i}", "rb") as f:
            d = pickle.load(f, encoding="bytes")
        got.append(d[b"data"])
        labels += d[b"labels"]
    assert np.array_equal(np.concatenate(got), _cifar_rows(train[0])) and labels == train[1]
    with open(base / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert np.array_equal(d[b"data"], _cifar_rows(test[0])) and d[b"labels"] == [9, 8, 7]
    ds = CifarDataset(str(tmp_path), "cifar10", train=True)
    assert np.array_equal(ds.data, train[0]) and ds.classes[:2] == ["c0", "c1"]


def test_generated_dataset_is_seeded_and_read_by_the_cifar_reader(tmp_path):
    root = write_procedural_cifar10(str(tmp_path / "a"), train_per_class=3, test_per_class=2, num_classes=4, seed=5)
    ds = CifarDataset(root, "cifar10", train=True)
    x, y = make_split(3, 4, 32, seed=10)          # the train stream of seed 5
    assert np.array_equal(ds.data, x) and ds.targets == y == [0, 1, 2, 3] * 3
    assert ds.classes == [*TEXTURES[:4], *(f"unused_{i}" for i in range(4, 10))]
    assert len(CifarDataset(root, "cifar10", train=False)) == 8
    again = write_procedural_cifar10(str(tmp_path / "b"), 3, 2, 4, seed=5)
    other = write_procedural_cifar10(str(tmp_path / "c"), 3, 2, 4, seed=6)
    for name in ("data_batch_1", "test_batch"):
        blob = [Path(r, "cifar-10-batches-py", name).read_bytes() for r in (root, again, other)]
        assert blob[0] == blob[1] != blob[2]


def test_colour_says_nothing_about_the_class_but_geometry_does():
    """kNN on each image's mean colour is at chance; kNN on the orientation energy of its grey-level
    gradients (a colour-free geometric feature) is far above it."""
    xtr, ytr = make_split(30, 10, 32, seed=0)
    xte, yte = make_split(10, 10, 32, seed=1)

    def colour(x):
        return x.reshape(len(x), -1, 3).mean(1)

    def geometry(x):
        g = x.astype(np.float64).mean(-1)
        gy, gx = np.gradient(g, axis=(1, 2))
        mag, ang = np.hypot(gx, gy), np.mod(np.arctan2(gy, gx), np.pi)
        bins = np.minimum((ang / np.pi * 8).astype(int), 7)
        hist = np.stack([np.bincount(b.ravel(), m.ravel(), 8) for b, m in zip(bins, mag)])
        spec = np.abs(np.fft.fft2(g - g.mean((1, 2), keepdims=True)))[:, :8, :8].reshape(len(x), -1)
        f = np.concatenate([hist / hist.sum(1, keepdims=True), spec / spec.sum(1, keepdims=True)], 1)
        return f

    acc = {name: KNeighborsClassifier(5).fit(feat(xtr), ytr).score(feat(xte), yte)
           for name, feat in (("colour", colour), ("geometry", geometry))}
    assert acc["colour"] < 0.2, acc          # chance is 0.1
    assert acc["geometry"] > 0.6, acc


def test_learning_check_data_is_seeded_and_its_nuisances_vary_within_each_class(tmp_path):
    """``write_invariant_cifar10``: classes interleaved, the class names, the same bytes for the same seed;
    within one class the images' brightness and colour (the colour-jitter draws) and their texture
    period differ (tests/test_learning_check.py trains on it)."""
    root = write_invariant_cifar10(str(tmp_path / "a"), train_per_class=20, test_per_class=2, seed=3)
    ds = CifarDataset(root, "cifar10", train=True)
    assert ds.targets == [0, 1, 2, 3] * 20 and len(CifarDataset(root, "cifar10", train=False)) == 8
    assert ds.classes[:4] == list(INVARIANT_CLASSES) and ds.classes[4] == "unused_4"
    again = write_invariant_cifar10(str(tmp_path / "b"), 20, 2, seed=3)
    other = write_invariant_cifar10(str(tmp_path / "c"), 20, 2, seed=4)
    blob = [Path(r, "cifar-10-batches-py", "data_batch_1").read_bytes() for r in (root, again, other)]
    assert blob[0] == blob[1] != blob[2]
    stripes = ds.data[np.asarray(ds.targets) == 0].astype(np.float64)      # horizontal stripes
    mean_rgb = stripes.reshape(20, -1, 3).mean(1)
    assert mean_rgb.mean(1).std() > 8 and np.ptp(mean_rgb[:, 0] - mean_rgb[:, 2]) > 40
    rows = stripes.mean((2, 3))                                             # one value per row: the stripe profile
    spectrum = np.abs(np.fft.rfft(rows - rows.mean(1, keepdims=True), axis=1))
    assert len(set(spectrum.argmax(1))) >= 3                                # periods 4-10 px: several frequencies
