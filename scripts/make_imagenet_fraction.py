#!/usr/bin/env python
"""Build the 1 % / 10 % ImageNet subsets of the semi-supervised evaluation (DisCo ``data/imagenet_1_fraction.py``,
disco_pcl_evals.md C3) from SimCLR's split files.

    python scripts/make_imagenet_fraction.py --src /data/imagenet --split_file 1percent.txt --dst /data/imagenet_1_fraction
    python scripts/make_imagenet_fraction.py --src /data/imagenet --ratio 10 --split_dir imagenet_subsets --dst /data/in10
    # then: eval_linear.py --protocol disco_semi -a efficientb0 --learning-rate 3.0 -b 256 --pretrained ... /data/imagenet_1_fraction

The split files are ``google-research/simclr:imagenet_subsets/{1,10}percent.txt`` (identical to DisCo's
``data/1percent.txt`` / ``10percent.txt``): one ``<wnid>_<n>.JPEG`` per line, 12,811 / 128,116 lines,
the class being the prefix before ``_``. Every line is used: the official script reads the file with
``pandas.read_csv`` without ``header=None`` and so skips the first image (12,810 / 128,115 copied).

Output: ``<dst>/train/<wnid>/<file>`` (symlinks; ``--copy`` copies as the official script does),
``<dst>/val/<wnid>/<file>`` for the same classes (the full validation set: Reproduction puts ``val``
next to the subset's ``train``), and ``<dst>/train.txt`` / ``val.txt`` lists. The same split file can
instead be given to ``eval_linear.py --train_list`` without building a folder.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "scripts")):
    if p not in sys.path:
        sys.path.insert(0, p)

import make_imagenet_subset as subset  # noqa: E402
from src.errors import UserError, cli_main  # noqa: E402

EXPECTED_LINES = {1: 12811, 10: 128116}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="ImageNet root with train/<wnid>/ (and val/<wnid>/)")
    p.add_argument("--dst", required=True, help="output root (created)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--split_file", help="SimCLR split file (<wnid>_<n>.JPEG per line)")
    g.add_argument("--ratio", type=int, choices=sorted(EXPECTED_LINES), help="1 or 10: <split_dir>/<ratio>percent.txt")
    p.add_argument("--split_dir", default=".", help="directory holding 1percent.txt / 10percent.txt (with --ratio)")
    p.add_argument("--copy", action="store_true", help="copy files instead of symlinking them (the official script copies)")
    p.add_argument("--no_val", action="store_true", help="do not add the validation split")
    return p


def read_split(path: str) -> list[str]:
    """The image names of a SimCLR split file, every line (no header), blank lines ignored."""
    if not os.path.isfile(path):
        raise UserError(f"split file not found: {path}")
    names = [ln.strip() for ln in open(path) if ln.strip()]
    if not names:
        raise UserError(f"split file {path} is empty")
    bad = [n for n in names if "_" not in os.path.basename(n)]
    if bad:
        raise UserError(f"{path} is not a SimCLR split file: line {names.index(bad[0]) + 1} ({bad[0]!r}) "
                        "is not '<wnid>_<n>.JPEG'")
    return names


@cli_main
def main(argv=None) -> dict[str, int]:
    args = get_parser().parse_args(argv)
    split = args.split_file or os.path.join(args.split_dir, f"{args.ratio}percent.txt")
    names = read_split(split)
    if args.ratio and len(names) != EXPECTED_LINES[args.ratio]:
        print(f"note: {split} has {len(names)} lines, SimCLR's {args.ratio}% split has {EXPECTED_LINES[args.ratio]}",
              file=sys.stderr)
    os.makedirs(args.dst, exist_ok=True)
    sub_args = subset.get_parser().parse_args(
        ["--src", args.src, "--dst", args.dst, "--train_list", split] + (["--copy"] if args.copy else [])
        + (["--splits", "train"] if args.no_val else []))
    counts = subset.build(sub_args)
    if counts.get("train") != len(names):  # pragma: no cover - read_file_list keeps every line
        raise UserError(f"{counts.get('train')} images written for the {len(names)} lines of {split}")
    return counts


if __name__ == "__main__":
    main()
