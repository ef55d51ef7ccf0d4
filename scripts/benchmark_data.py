#!/usr/bin/env python
"""Images per second per loader worker: the reference PIL pipeline against the fast path's worker
half (decode, random-resized crops and flips into uint8; src/data/fast_path.py), in the same run,
for the LORAC / SwAV multi-crop preset (2×224 + 6×96) and the MoCo v2 two-crop preset. On a GPU it
also measures the device half (colour jitter, grayscale, blur, solarize, normalisation, batched) per
image, and the decode alone is timed as the floor of both.

One worker = this process with one thread (``torch.set_num_threads(1)``), reading every image of
the folder through :class:`~src.data.datasets.ImageDataset` exactly as a DataLoader worker would
(``dataset[(index, epoch)]``). Without ``--data`` it writes a folder of realistic JPEGs (500×375,
quality 90: smooth colour fields, edges and texture, ~60-90 kB each) first.

    python scripts/benchmark_data.py                       # generated JPEGs, both presets
    python scripts/benchmark_data.py --data /imagenet/train --images 500 --presets lorac
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from src.cli import HelpFormatter  # noqa: E402
from src.data.datasets import ImageDataset, collate_crops  # noqa: E402
from src.data.fast_path import split_transform  # noqa: E402
from src.data.gpu_pipeline import reference_preset  # noqa: E402
from src.errors import cli_main  # noqa: E402

PRESETS = {"lorac": "LORAC / SwAV multi-crop 2×224 + 6×96", "moco_v2": "MoCo v2 aug-plus, 2×224"}
TARGET = {"lorac": 5.0}   # issue 15: the worker-side cost of the fast path ≥ 5× lower for multi-crop


def make_jpegs(out: str, n: int, size=(500, 375), seed: int = 0) -> str:
    """``n`` JPEGs of ImageNet's typical size in ``out/train/c0`` (one class: the benchmark only reads)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(out, "train", "c0")
    os.makedirs(folder, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        base = rng.uniform(40, 215, 3)
        field = sum(rng.uniform(20, 60) * np.sin(xx * rng.uniform(0.005, 0.03) + yy * rng.uniform(0.005, 0.03)
                                                  + rng.uniform(0, 6.3)) for _ in range(3))
        img = base[None, None, :] + field[..., None] * rng.uniform(0.3, 1.0, 3)[None, None, :]
        for _ in range(6):   # objects with edges
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(15, 90)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 12, img.shape)   # sensor noise / texture: what makes JPEGs realistic in size
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return out


def per_image_seconds(datasets: list[ImageDataset], n: int, repeats: int) -> list[float]:
    """For each dataset, the median over ``repeats`` passes of the seconds per image of
    ``ds[(i, epoch)]`` for i < n. The passes of the datasets alternate, so that a machine whose load
    drifts during the run weighs on all of them alike (the ratios are what the benchmark is for)."""
    times: list[list[float]] = [[] for _ in datasets]
    for r in range(repeats):
        for ds, t in zip(datasets, times):
            t0 = time.perf_counter()
            for i in range(n):
                ds[(i, r)]
            t.append((time.perf_counter() - t0) / n)
    return [statistics.median(t) for t in times]


def decode_seconds(ds: ImageDataset, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            ds._load(i)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def device_seconds(worker_ds: ImageDataset, photometry, device: torch.device, batch: int, repeats: int) -> float:
    """Seconds per image of the device half on a batch of the worker half's crops."""
    crops, _, index = collate_crops([worker_ds[(i % len(worker_ds), 0)] for i in range(batch)])
    crops = [c.to(device) for c in crops]
    seeds = index.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    photometry(crops, seeds)   # warm-up (kernels, caches)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        photometry(crops, seeds)
        sync()
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=None, help="a folder <data>/train/<class>/<image> (default: generated JPEGs)")
    p.add_argument("--make", type=int, default=48, help="JPEGs to generate without --data")
    p.add_argument("--images", type=int, default=48, help="images read per pass (at most the folder's)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement (median)")
    p.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    p.add_argument("--size", type=int, default=224, help="global crop size (multi-crop locals stay 96)")
    p.add_argument("--device", default="auto", help="device of the device-half timing: auto (cuda if any), cpu, cuda")
    p.add_argument("--device_batch", type=int, default=256, help="images per device-half batch")
    return p


@cli_main
def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    torch.set_num_threads(1)   # one loader worker
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        args.data = make_jpegs(tmp.name, args.make)
        print(f"generated {args.make} JPEGs of 500×375 in {args.data}")
    root = os.path.join(args.data, "train")
    plain = ImageDataset(root if os.path.isdir(root) else args.data)
    n = min(args.images, len(plain))
    sizes = [os.path.getsize(p) for p, _ in plain.samples[:n]]
    print(f"{n} images, mean {np.mean(sizes) / 1024:.0f} kB | one worker = 1 thread | device half on {device}")
    dec = decode_seconds(plain, n, args.repeats)
    rows = []
    for name in args.presets:
        ref = reference_preset(name, args.size)
        ref_ds = ImageDataset(plain.root, ref)
        worker, photometry = split_transform(ref)
        fast_ds = ImageDataset(plain.root, worker)
        t_ref, t_fast = per_image_seconds([ref_ds, fast_ds], n, args.repeats)
        t_dev = device_seconds(fast_ds, photometry, device, min(args.device_batch, 4 * n), args.repeats)
        rows.append((name, 1 / t_ref, 1 / t_fast, t_ref / t_fast, t_dev))
    print(f"\ndecode alone: {1 / dec:.0f} img/s per worker\n")
    print("| preset | reference img/s/worker | fast path img/s/worker | ratio | target | device half µs/img |")
    print("|---|---|---|---|---|---|")
    for name, ref_s, fast_s, ratio, t_dev in rows:
        target = f"≥ {TARGET[name]:.0f}× {'PASS' if ratio >= TARGET[name] else 'FAIL'}" if name in TARGET else "—"
        print(f"| {PRESETS[name]} | {ref_s:.1f} | {fast_s:.1f} | {ratio:.1f}× | {target} | "
              f"{t_dev * 1e6:.0f} ({device.type}) |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
