#!/usr/bin/env python
"""``make demo``: MoCo v2 on scikit-learn's digits, then kNN and linear evaluation of the pretrained
backbone next to a randomly initialised one, and two figures of the run: the t-SNE of the pretrained
features of the validation images (``tsne.png``) and its training curves (``training_curves.png``).

Data: the 1,797 8×8 digits that ship inside scikit-learn, upsampled to 32 px RGB and split 70/30
(stratified, seed 0) into ``data/digits/{train,val}``. Every step is one of the repository's own
commands (printed before it runs), so the demo is also a worked example of the command lines.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(cmd: list[str], quiet: bool = False) -> float:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                       text=True)
    if r.returncode:
        if quiet and r.stdout:
            print(r.stdout[-4000:])
        raise SystemExit(f"demo step failed ({r.returncode}): {' '.join(cmd)}")
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=60, help="pretraining epochs")
    p.add_argument("--linear_epochs", type=int, default=30)
    p.add_argument("--out", default=os.path.join(ROOT, "demo_out"))
    p.add_argument("--data", default=os.path.join(ROOT, "data", "digits"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    py = sys.executable
    from src.data.builtin import make_digits_folder
    t_all = time.time()
    ntr, nva = make_digits_folder(args.data, size=32)
    print(f"digits: {ntr} train / {nva} val images (32 px) in {args.data}")

    pre = os.path.join(args.out, "moco")
    t_pre = run([py, "main_moco.py", "-a", "resnet18", "--image_size", "32", "-b", "64", "--lr", "0.015", "--mlp",
                 "--moco-t", "0.2", "--moco-k", "256", "--aug-plus", "--cos", "--epochs", str(args.epochs),
                 "-j", str(args.workers), "--print-freq", "19", "--knn_freq", str(max(args.epochs // 4, 1)),
                 "--output_dir", pre, args.data])
    ckpt = os.path.join(pre, f"checkpoint_{args.epochs - 1:04d}.pth.tar")

    rows = []
    for name, pretrained in (("MoCo v2 (pretrained)", ckpt), ("random init", "")):
        tag = "moco" if pretrained else "random"
        common = ["-a", "resnet18", "--image_size", "32", "-j", str(args.workers)]
        if pretrained:
            common += ["--pretrained", pretrained]
        knn_dir = os.path.join(args.out, f"knn_{tag}")
        t_knn = run([py, "eval_knn.py", *common, "--nb_knn", "20", "--dump_path", knn_dir, args.data], quiet=True)
        knn = json.load(open(os.path.join(knn_dir, "knn_results.json")))
        lin_dir = os.path.join(args.out, f"linear_{tag}")
        t_lin = run([py, "eval_linear.py", *common, "--epochs", str(args.linear_epochs), "-b", "128", "--lr", "1.0",
                     "--cos", "--wd", "0", "--print-freq", "100", "--dump_path", lin_dir, args.data], quiet=True)
        lin = json.load(open(os.path.join(lin_dir, "results.json")))
        rows.append((name, _knn_top1(knn), lin["best_acc1"], lin["last_acc1"], t_knn + t_lin))

    figures = [os.path.join(args.out, "tsne.png"), os.path.join(args.out, "training_curves.png")]
    t_fig = run([py, "scripts/visualize_embeddings.py", "-a", "resnet18", "--pretrained", ckpt, "--image_size", "32",
                 "-j", str(args.workers), "--classes", "all", "--out", os.path.join(args.out, "embeddings"),
                 "--output", figures[0], args.data], quiet=True)
    t_fig += run([py, "scripts/plot_training.py", pre, "--labels", "MoCo v2, ResNet-18", "--title",
                  f"MoCo v2 on sklearn digits ({args.epochs} epochs)", "--output", figures[1]], quiet=True)

    print("\nMoCo v2, ResNet-18, sklearn digits at 32 px "
          f"({ntr} train / {nva} val), {args.epochs} pretraining epochs in {t_pre / 60:.1f} min")
    print("| backbone | kNN top-1 (k=20) | linear top-1 best | linear top-1 last | eval time |")
    print("|---|---|---|---|---|")
    for name, k, lb, ll, t in rows:
        print(f"| {name} | {k:.1f} | {lb:.1f} | {ll:.1f} | {t:.0f} s |")
    print(f"\nfigures ({t_fig:.0f} s): {figures[0]} (t-SNE of the val features), {figures[1]} (loss, lr, kNN)")
    print(f"\ntotal time {(time.time() - t_all) / 60:.1f} min; outputs in {args.out}")


def _knn_top1(res: dict) -> float:
    return float(res["knn"]["20"]["top1"])


if __name__ == "__main__":
    main()
