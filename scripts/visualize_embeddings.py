#!/usr/bin/env python
"""t-SNE of a backbone's features on a labelled image folder, coloured by class (DisCo
``main_embd.py`` + ``visualization/draw.py``, swav.md §8).

    # 1. features of <data>/val saved once (any checkpoint layout), then drawn
    python scripts/visualize_embeddings.py -a resnet34 --pretrained r101_r34/checkpoint_0199.pth.tar \
        --out embeddings/r101_r34 /data/imagenet
    # 2. drawn again from the saved features: other classes, more images, PDF
    python scripts/visualize_embeddings.py -a resnet34 --out embeddings/r101_r34 --classes 0-19 \
        --per_class 100 --output figures/r101_r34.pdf

Step 1 (with DIR) runs the frozen backbone in eval mode over ``DIR/<--split>`` with the evaluation
transform (Resize(size·256/224) + CenterCrop(size), as ``main_embd.py``), sharded over the processes
(torchrun or ``--multiprocessing-distributed`` work), and saves the pooled features, unnormalised,
to ``<out>/<arch>_embd.npy``, the labels to ``<arch>_label.npy`` and the class names to
``<arch>_classes.json``. Step 2 (always, unless ``--no_draw``) keeps the first ``--per_class``
images of each class of ``--classes`` (draw.py: classes 5-14 × 50), embeds them with scikit-learn's
``TSNE(2, init='pca', random_state=--seed)``, saves the coordinates next to the figure
(``<figure>.npz``: ``coords``, ``labels``, ``indices`` into the saved features, ``classes``) and
draws one colour per class. Without DIR only step 2 runs; it also reads DisCo's own
``<arch>_embd`` / ``<arch>_label`` files (no extension).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src import distributed as D  # noqa: E402
from src import sanity  # noqa: E402
from src.checkpoint import backbone_or_random  # noqa: E402
from src.cli import HelpFormatter, train_dir  # noqa: E402
from src.data.datasets import ImageDataset  # noqa: E402
from src.data.transforms import eval_transform  # noqa: E402
from src.errors import UserError, cli_main  # noqa: E402
from src.eval.features import extract_features  # noqa: E402
from src.logger import setup_logging  # noqa: E402
from src.models.backbones import arch_spec  # noqa: E402
from src.plots import check_figure_path, class_colours, pyplot, save_figure  # noqa: E402

log = logging.getLogger("ssl")
#: draw.py's selection: classes 5..14, the first 50 images of each
DISCO_CLASSES, DISCO_PER_CLASS = "5-14", 50
ALPHA = 0.8  # marker opacity


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="t-SNE of backbone features, coloured by class (DisCo main_embd.py "
                                "+ draw.py)", formatter_class=HelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="dataset root: compute and save the features of DIR/<split> (omitted: draw the saved ones)")
    p.add_argument("--split", default="val", help="sub-folder of DIR holding <class>/<image>")
    p.add_argument("-a", "--arch", default="resnet50", help="backbone architecture (also names the saved files)")
    p.add_argument("--pretrained", default="", help="checkpoint (any known layout); empty: random backbone")
    p.add_argument("--cifar_stem", action="store_true", help="random backbone only (a checkpoint's stem is detected)")
    p.add_argument("--image_size", type=int, default=224, help="eval crop in px (Resize(size*256/224) + CenterCrop)")
    p.add_argument("-b", "--batch_size", "--batch-size", dest="batch_size", type=int, default=128,
                   help="feature-extraction batch per process")
    p.add_argument("-j", "--workers", type=int, default=4, help="data loading workers per process")
    p.add_argument("--seed", type=int, default=0, help="t-SNE random_state (and a random backbone's init)")
    p.add_argument("--out", default="embeddings", help="directory of <arch>_embd.npy, <arch>_label.npy, <arch>_classes.json")
    p.add_argument("--output", default=None, help="figure, .png or .pdf (default: <out>/<arch>_tsne.png)")
    p.add_argument("--classes", default=None,
                   help="class indices to draw: 'a-b' ranges and commas ('5-14', '0,3,7-9') or 'all' "
                        f"(default: {DISCO_CLASSES} as draw.py, or all when the data has fewer classes)")
    p.add_argument("--per_class", type=int, default=DISCO_PER_CLASS, help="first N images of each class (0: all)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (capped below the image count)")
    p.add_argument("--no_draw", action="store_true", help="only compute and save the features")
    D.add_dist_args(p)
    return p


# ----------------------------------------------------------------------------- step 1: features
def feature_files(out: str, arch: str) -> tuple[str, str, str]:
    return (os.path.join(out, f"{arch}_embd.npy"), os.path.join(out, f"{arch}_label.npy"),
            os.path.join(out, f"{arch}_classes.json"))


def main_worker(info: D.DistInfo, args: argparse.Namespace) -> None:
    setup_logging(None, info.rank)
    folder = os.path.join(args.data, args.split)
    dataset = ImageDataset(folder, eval_transform(args.image_size))
    net = backbone_or_random(args.pretrained, args.arch, seed=args.seed, cifar_stem=args.cifar_stem, what="features of")
    net = net.to(info.device).eval()
    sanity.report(info, sanity.image_size_warning(dataset, args.image_size, "--image_size", "t-SNE images"))
    log.info("%s: %d images, %d classes, %d processes", folder, len(dataset), len(dataset.classes), info.world_size)
    feats, labels = extract_features(net, dataset, args.batch_size, args.workers, info.device, normalize=False,
                                     desc="features")
    if not info.is_main:
        return
    embd, label, names = feature_files(args.out, args.arch)
    os.makedirs(args.out, exist_ok=True)
    np.save(embd, feats.cpu().numpy().astype(np.float32))
    np.save(label, labels.cpu().numpy().astype(np.int64))
    with open(names, "w") as f:
        json.dump({"classes": dataset.classes, "data": os.path.abspath(folder), "arch": args.arch,
                   "pretrained": args.pretrained, "image_size": args.image_size}, f, indent=2)
    print(f"saved {feats.shape[0]}×{feats.shape[1]} features of {folder} to {embd}", flush=True)
    if not args.no_draw:
        draw(args)


# ----------------------------------------------------------------------------- step 2: t-SNE
def parse_classes(spec: str | None, num_classes: int) -> list[int]:
    """'5-14' / '0,3,7-9' / 'all' → sorted class indices, each checked against ``num_classes``;
    None → draw.py's 5-14, or every class when there are fewer than 15."""
    if spec is None:
        spec = DISCO_CLASSES if num_classes > 14 else "all"
    if spec.strip().lower() == "all":
        return list(range(num_classes))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--classes {spec!r}: use ranges and commas such as 5-14 or 0,3,7-9, or 'all'") from None
    bad = sorted(c for c in out if not 0 <= c < num_classes)
    if bad or not out:
        raise UserError(f"--classes {spec!r}: the saved features have classes 0-{num_classes - 1} (got {bad or 'none'})")
    return sorted(out)


def select(labels: np.ndarray, classes: list[int], per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples (all when 0) of each class, class by class."""
    idx = [np.flatnonzero(labels == c)[:per_class or None] for c in classes]
    return np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)


def load_features(out: str, arch: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    embd, label, names = feature_files(out, arch)
    if not os.path.isfile(embd) and os.path.isfile(embd[:-4]):  # DisCo main_embd.py's names, no extension
        embd, label = embd[:-4], label[:-4]
    if not os.path.isfile(embd) or not os.path.isfile(label):
        raise UserError(f"no saved features {embd} / {label}: give the data folder DIR (and --pretrained) to "
                        "compute them first")
    try:
        x, y = np.load(embd), np.load(label).reshape(-1)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read {embd} / {label}: {e}") from e
    if x.ndim != 2 or len(x) != len(y):
        raise UserError(f"{embd} ({x.shape}) and {label} ({y.shape}) are not N×D features with N labels")
    y = y.astype(np.int64)
    classes = [str(c) for c in range(int(y.max()) + 1)]
    if os.path.isfile(names):
        with open(names) as f:
            classes = json.load(f)["classes"]
    return x, y, classes


def draw(args: argparse.Namespace) -> str:
    """t-SNE of the selected saved features → ``<figure>.npz`` and the figure; returns the figure path."""
    from sklearn.manifold import TSNE
    x, y, names = load_features(args.out, args.arch)
    classes = parse_classes(args.classes, len(names))
    idx = select(y, classes, args.per_class)
    if len(idx) < 3:
        raise UserError(f"only {len(idx)} images in classes {args.classes or 'default'}: need at least 3 for t-SNE")
    perplexity = min(args.perplexity, len(idx) - 1.0)
    if perplexity < args.perplexity:
        log.warning("t-SNE perplexity lowered to %g (%d images)", perplexity, len(idx))
    coords = TSNE(n_components=2, init="pca", random_state=args.seed, perplexity=perplexity).fit_transform(x[idx])
    fig_path = args.output or os.path.join(args.out, f"{args.arch}_tsne.png")
    os.makedirs(os.path.dirname(os.path.abspath(fig_path)), exist_ok=True)
    np.savez(os.path.splitext(fig_path)[0] + ".npz", coords=coords, labels=y[idx], indices=idx,
             classes=np.array([names[c] for c in classes]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for c, colour in zip(classes, class_colours(len(classes))):
        m = y[idx] == c
        ax.scatter(coords[m, 0], coords[m, 1], s=10, color=colour, label=names[c], alpha=ALPHA, linewidths=0)
    ax.set_title(f"t-SNE of {args.arch} features ({len(idx)} images, {len(classes)} classes)")
    ax.set_xlabel("Dim_1")
    ax.set_ylabel("Dim_2")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2, frameon=False,
              ncol=1 + len(classes) // 25, title="class")
    save_figure(fig, fig_path)
    print(f"t-SNE of {len(idx)} images ({len(classes)} classes) written to {fig_path}", flush=True)
    return fig_path


@cli_main
def main(argv=None) -> None:
    args = sanity.parse_args(get_parser, argv)
    if args.output:
        check_figure_path(args.output)
    if args.per_class < 0:
        raise UserError("--per_class must be >= 0 (0: every image)")
    if args.data is None:
        if args.no_draw:
            raise UserError("--no_draw without DIR: nothing to do")
        setup_logging(None)
        draw(args)
        return
    arch_spec(args.arch)
    train_dir(args.data, args.split)
    if args.pretrained and not os.path.isfile(args.pretrained):
        raise UserError(f"--pretrained checkpoint not found: {args.pretrained}")
    D.launch(main_worker, args)


if __name__ == "__main__":
    main()
