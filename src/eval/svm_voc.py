"""VOC07 linear SVM evaluation (PCL ``eval_svm_voc.py`` / ``voc.py``; disco_pcl_evals.md C1, D3.1).

- Data: the VOC2007 devkit layout (``JPEGImages``, ``Annotations``, ``ImageSets/Main``); labels per
  class from ``ImageSets/Main/<cls>_<set>.txt`` (+1 present, −1 absent, 0 difficult), or from the
  ``Annotations`` XML when those files are missing. Difficult (0) counts as negative.
- Features: pooled backbone, L2-normalised as x / (‖x‖ + 1e-5).
- One ``LinearSVC`` per class: C = cost, class weights {+1: 2, −1: 1}, squared hinge, dual, tol 1e-4,
  2000 iterations, ``random_state`` 0; scores = ``decision_function``.
- AP: area under the monotone precision envelope at every recall change ("all points").
- Low-shot: for each k, 5 runs; each run shuffles, per class, the trainval images containing it and
  keeps the first k (one seeded ``random`` stream, loop order k → cost → run).
"""
from __future__ import annotations

import os
import random
import xml.etree.ElementTree as ET

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError
from .svm import CLASSES, fit_and_score, l2_normalise, svm_map, voc_ap  # noqa: F401 (re-exported)

LOW_SHOT_KS = (1, 2, 4, 8, 16)
N_RUNS = 5


def find_voc_root(root: str) -> str:
    """``root`` itself, ``root/VOC2007`` or ``root/VOCdevkit/VOC2007``: the first with the devkit folders."""
    for cand in (root, os.path.join(root, "VOC2007"), os.path.join(root, "VOCdevkit", "VOC2007")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")) and os.path.isdir(os.path.join(cand, "ImageSets", "Main")):
            return cand
    raise UserError(f"no VOC2007 devkit under {root}: expected JPEGImages/ and ImageSets/Main/ in it, in "
                    f"{root}/VOC2007 or in {root}/VOCdevkit/VOC2007")


def _read_ids(path: str) -> list[str]:
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def _labels_from_annotations(voc: str, ids: list[str]) -> np.ndarray:
    y = -np.ones((len(ids), len(CLASSES)), dtype=np.int64)
    for r, i in enumerate(ids):
        path = os.path.join(voc, "Annotations", f"{i}.xml")
        if not os.path.isfile(path):
            raise UserError(f"{voc}: no ImageSets/Main/<class>_<set>.txt files and no annotation {path}")
        for obj in ET.parse(path).getroot().iter("object"):
            c = CLASSES.index(obj.findtext("name").strip())
            difficult = obj.findtext("difficult", "0").strip() == "1"
            y[r, c] = max(y[r, c], 0 if difficult else 1)
    return y


def read_split(voc: str, split: str) -> tuple[list[str], np.ndarray]:
    """Image ids of ``split`` (``trainval`` / ``test``) and their labels in {−1, 0, +1} (N×20)."""
    main = os.path.join(voc, "ImageSets", "Main")
    set_file = os.path.join(main, f"{split}.txt")
    cls_files = [os.path.join(main, f"{c}_{split}.txt") for c in CLASSES]
    if os.path.isfile(set_file):
        ids = _read_ids(set_file)
    elif os.path.isfile(cls_files[0]):
        ids = _read_ids(cls_files[0])
    else:
        raise UserError(f"{main} has neither {split}.txt nor {CLASSES[0]}_{split}.txt")
    if not ids:
        raise UserError(f"the {split} split of {voc} is empty")
    if not all(os.path.isfile(p) for p in cls_files):
        return ids, _labels_from_annotations(voc, ids)
    pos = {i: r for r, i in enumerate(ids)}
    y = np.zeros((len(ids), len(CLASSES)), dtype=np.int64)
    for c, p in enumerate(cls_files):
        with open(p) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] in pos:
                    y[pos[parts[0]], c] = int(parts[1])
    return ids, y


class VOCImages(Dataset):
    """``(image, label vector, index)`` of one split (labels as read, difficult = 0)."""

    def __init__(self, voc: str, ids: list[str], labels: np.ndarray, transform):
        self.paths = [os.path.join(voc, "JPEGImages", f"{i}.jpg") for i in ids]
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise UserError(f"{len(missing)} images of the list are missing, e.g. {missing[0]}")
        self.labels, self.transform = torch.as_tensor(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img), self.labels[i], i


def low_shot_indices(labels: np.ndarray, k: int, rng: random.Random) -> list[int]:
    """One low-shot draw: per class in order, shuffle the trainval images containing it (label > 0)
    with ``rng`` and keep the first ``k``; concatenated (duplicates kept)."""
    out: list[int] = []
    for c in range(labels.shape[1]):
        ids = [int(i) for i in np.flatnonzero(labels[:, c] > 0)]
        rng.shuffle(ids)
        out += ids[:k]
    return out
