#!/usr/bin/env python
"""Write an ImageNet subset (e.g. SogCLR's ImageNet-100) as a folder of symlinks.

    # ImageNet-100 of SogCLR ("ImageNet-S"): the first 100 class folders in sorted order
    python scripts/make_imagenet_subset.py --src /data/imagenet1000 --dst /data/imagenet100 --num_classes 100
    # any subset given by file lists ('train/<wnid>/<file> [label]', '<wnid>/<file>' or '<wnid>_<n>.JPEG')
    python scripts/make_imagenet_subset.py --src /data/imagenet1000 --dst /data/sub \
        --train_list train.txt --val_list val.txt
    # or by a list of class folder names (one per line)
    python scripts/make_imagenet_subset.py --src /data/imagenet1000 --dst /data/sub --classes wnids.txt

``<src>`` holds ``train/<wnid>/*`` and (after ``valprep.sh``) ``val/<wnid>/*``. The result is
``<dst>/{train,val}/<wnid>/<file>`` symlinks (``--copy`` copies instead) plus ``<dst>/train.txt`` and
``<dst>/val.txt`` in the official list format (``train/<wnid>/<file> <label>``, labels in sorted
class order). Running it again is a no-op; an existing entry that points elsewhere is an error.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.data.datasets import IMG_EXTENSIONS, find_classes, read_file_list  # noqa: E402
from src.errors import UserError, cli_main  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="full dataset root with train/ (and val/) class folders")
    p.add_argument("--dst", required=True, help="output root (created)")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--num_classes", type=int, default=None, help="keep the first N class folders (sorted)")
    sel.add_argument("--classes", default=None, help="file with one class folder name per line")
    sel.add_argument("--train_list", default=None, help="file list of the training images to keep")
    p.add_argument("--val_list", default=None, help="file list of the validation images (with --train_list)")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--copy", action="store_true", help="copy files instead of symlinking them")
    return p


def _images(folder: str) -> list[str]:
    exts = tuple(e.lower() for e in IMG_EXTENSIONS)
    out = []
    for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
        out += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(exts)]
    return out


def select(args: argparse.Namespace) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
    """(the subset's classes, split → [(absolute source path, class)] for every split in ``--src``)."""
    train_classes = find_classes(os.path.join(args.src, "train"))
    lists = {"train": args.train_list, "val": args.val_list}
    if args.num_classes is not None:
        if args.num_classes < 1 or args.num_classes > len(train_classes):
            raise UserError(f"--num_classes {args.num_classes}: {args.src}/train has {len(train_classes)} class folders")
        classes = train_classes[:args.num_classes]
    elif args.classes:
        if not os.path.isfile(args.classes):
            raise UserError(f"class file not found: {args.classes}")
        classes = sorted({ln.strip() for ln in open(args.classes) if ln.strip()})
        unknown = [c for c in classes if c not in set(train_classes)]
        if unknown:
            raise UserError(f"{len(unknown)} classes of {args.classes} are not in {args.src}/train, e.g. {unknown[0]}")
    elif args.train_list:
        classes = sorted({c for _, c in read_file_list(args.train_list, os.path.join(args.src, "train"))})
    else:
        raise UserError("choose the subset with --num_classes, --classes or --train_list")
    out: dict[str, list[tuple[str, str]]] = {}
    for split in args.splits:
        sdir = os.path.join(args.src, split)
        if not os.path.isdir(sdir):
            print(f"note: {sdir} does not exist, split skipped", file=sys.stderr)
            continue
        if lists.get(split):
            pairs = read_file_list(lists[split], sdir)
            missing = [p for p, _ in pairs if not os.path.exists(p)]
            if missing:
                raise UserError(f"{len(missing)} files of {lists[split]} are missing, e.g. {missing[0]}")
            extra = sorted({c for _, c in pairs} - set(classes))
            if extra:
                raise UserError(f"{lists[split]} has classes not in the training subset, e.g. {extra[0]}")
            out[split] = sorted(pairs)
            continue
        present = set(e.name for e in os.scandir(sdir) if e.is_dir())
        if not present:
            print(f"note: {sdir} has no class folders (run valprep.sh first), split skipped", file=sys.stderr)
            continue
        absent = [c for c in classes if c not in present]
        if absent:
            raise UserError(f"{sdir} lacks {len(absent)} of the subset's class folders, e.g. {absent[0]}")
        out[split] = [(p, c) for c in classes for p in _images(os.path.join(sdir, c))]
    return classes, out


def _place(src: str, dst: str, copy: bool) -> bool:
    """Create ``dst`` → ``src``; True if written, False if already there."""
    src = os.path.abspath(src)
    if os.path.lexists(dst):
        if os.path.islink(dst) and os.path.realpath(dst) == os.path.realpath(src):
            return False
        if copy and not os.path.islink(dst) and os.path.getsize(dst) == os.path.getsize(src):
            return False
        raise UserError(f"{dst} already exists and is not {src}: choose an empty --dst")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src, dst)
    return True


def build(args: argparse.Namespace) -> dict[str, int]:
    classes, chosen = select(args)
    label = {c: i for i, c in enumerate(classes)}  # one label map for every split: the subset's classes
    counts = {}
    for split, pairs in chosen.items():
        lines, written = [], 0
        for path, cls in pairs:
            rel = f"{split}/{cls}/{os.path.basename(path)}"
            written += _place(path, os.path.join(args.dst, rel), args.copy)
            lines.append(f"{rel} {label[cls]}\n")
        with open(os.path.join(args.dst, f"{split}.txt"), "w") as f:
            f.writelines(lines)
        counts[split] = len(pairs)
        print(f"{split}: {len(pairs)} images in {len({c for _, c in pairs})} classes ({written} new) -> {args.dst}/{split}")
    return counts


@cli_main
def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    if args.val_list and not args.train_list:
        raise UserError("--val_list needs --train_list")
    os.makedirs(args.dst, exist_ok=True)
    build(args)


if __name__ == "__main__":
    main()
