"""Detection data: VOC devkit folders and COCO json, named as Detectron2's built-in datasets.

``voc_<year>_<split>`` reads ``<root>/VOC<year>/{ImageSets/Main/<split>.txt, Annotations/*.xml,
JPEGImages/*.jpg}``; ``coco_<year>_<split>`` reads ``<root>/coco/annotations/instances_<split><year>.json``
and ``<root>/coco/<split><year>/`` (Detectron2's ``datasets/`` layout; ``<root>`` is
``$DETECTRON2_DATASETS``, default ``./datasets``).

As Detectron2 (disco_pcl_evals.md C5): VOC boxes become 0-based by subtracting 1 from ``xmin`` and
``ymin``; difficult objects are kept for training and flagged for the evaluation, which ignores them;
COCO crowd boxes are left out of training; training images without boxes are dropped; a training
image is flipped horizontally with probability 0.5 (seeded per image and epoch, so a resumed run
sees the same flips).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.datasets import EpochSampler, _pil_loader, augmentation_seed
from ..errors import UserError
from ..eval.svm import CLASSES as VOC_CLASSES

log = logging.getLogger("ssl")


@dataclass
class Record:
    """One image: 0-based ``xyxy`` boxes, labels 1..K (0 is the background), difficult flags."""
    path: str
    boxes: np.ndarray          # (N, 4) float32
    labels: np.ndarray         # (N,) int64
    difficult: np.ndarray      # (N,) bool
    image_id: int | str = 0    # VOC file id or COCO image id


@dataclass
class DatasetInfo:
    name: str
    records: list[Record]
    classes: list[str]
    year: int = 0
    coco_json: str | None = None            # COCO: the annotation file (pycocotools evaluation)
    category_ids: list[int] = field(default_factory=list)  # COCO: label k ↔ category_ids[k - 1]

    @property
    def is_voc(self) -> bool:
        return self.coco_json is None


def _voc_record(voc: str, img_id: str) -> Record:
    path = os.path.join(voc, "Annotations", f"{img_id}.xml")
    if not os.path.isfile(path):
        raise UserError(f"annotation not found: {path}")
    boxes, labels, difficult = [], [], []
    for obj in ET.parse(path).getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise UserError(f"{path}: unknown VOC class {name!r}")
        bb = obj.find("bndbox")
        x1, y1, x2, y2 = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
        labels.append(VOC_CLASSES.index(name) + 1)
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return Record(os.path.join(voc, "JPEGImages", f"{img_id}.jpg"), np.array(boxes, np.float32).reshape(-1, 4),
                  np.array(labels, np.int64), np.array(difficult, bool), img_id)


def load_voc(root: str, year: int, split: str) -> DatasetInfo:
    voc = os.path.join(root, f"VOC{year}")
    ids_file = os.path.join(voc, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(ids_file):
        raise UserError(f"voc_{year}_{split}: {ids_file} not found (expected the VOC devkit under "
                        f"{root}/VOC{year}: ImageSets/Main, Annotations, JPEGImages; set DETECTRON2_DATASETS)")
    with open(ids_file) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise UserError(f"{ids_file} lists no image")
    return DatasetInfo(f"voc_{year}_{split}", [_voc_record(voc, i) for i in ids], list(VOC_CLASSES), year)


def load_coco(json_path: str, image_dir: str, name: str) -> DatasetInfo:
    if not os.path.isfile(json_path):
        raise UserError(f"{name}: {json_path} not found (expected <DETECTRON2_DATASETS>/coco/annotations/)")
    with open(json_path) as f:
        data = json.load(f)
    cats = sorted(data.get("categories", []), key=lambda c: c["id"])
    if not cats:
        raise UserError(f"{json_path} has no categories")
    label = {c["id"]: k + 1 for k, c in enumerate(cats)}
    per_image: dict[int, list] = {}
    for a in data.get("annotations", []):
        per_image.setdefault(a["image_id"], []).append(a)
    records = []
    for img in sorted(data.get("images", []), key=lambda i: i["id"]):
        anns = [a for a in per_image.get(img["id"], []) if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32).reshape(-1, 4)
        records.append(Record(os.path.join(image_dir, img["file_name"]), boxes,
                              np.array([label[a["category_id"]] for a in anns], np.int64),
                              np.zeros(len(anns), bool), img["id"]))
    return DatasetInfo(name, records, [c["name"] for c in cats], coco_json=json_path,
                       category_ids=[c["id"] for c in cats])


def load_dataset(name: str, root: str) -> DatasetInfo:
    """A Detectron2 built-in dataset name → its records under ``root``."""
    m = re.fullmatch(r"voc_(\d{4})_(\w+)", name)
    if m:
        return load_voc(root, int(m.group(1)), m.group(2))
    m = re.fullmatch(r"coco_(\d{4})_(train|val|test)", name)
    if m:
        year, split = m.group(1), m.group(2)
        return load_coco(os.path.join(root, "coco", "annotations", f"instances_{split}{year}.json"),
                         os.path.join(root, "coco", f"{split}{year}"), name)
    raise UserError(f"unknown dataset {name!r}: use voc_<year>_<split> (e.g. voc_2007_trainval) or "
                    "coco_<year>_<split> (e.g. coco_2017_train)")


def training_records(infos: list[DatasetInfo]) -> list[Record]:
    """The union of the training sets, images without boxes left out (FILTER_EMPTY_ANNOTATIONS)."""
    classes = {tuple(i.classes) for i in infos}
    if len(classes) > 1:
        raise UserError(f"DATASETS.TRAIN mixes label sets: {', '.join(i.name for i in infos)}")
    recs = [r for i in infos for r in i.records]
    kept = [r for r in recs if len(r.boxes)]
    if len(kept) < len(recs):
        log.info("training: %d of %d images have no box and are left out", len(recs) - len(kept), len(recs))
    if not kept:
        raise UserError("the training sets hold no box")
    return kept


class DetectionDataset(Dataset):
    """``(image CxHxW in [0, 1] RGB, {"boxes", "labels"}, index)``. Training items are asked for as
    ``(index, epoch)`` and flipped with probability 0.5 from ``augmentation_seed(seed, epoch, index)``.
    Unreadable files are skipped as in :class:`~src.data.datasets.ImageDataset` (flagged once in memory
    shared with the loader workers, logged once, not decoded again): in training the next readable
    image takes the place of one; in evaluation the item is flagged ``unreadable`` and gets no
    detection (its boxes count as missed)."""

    MAX_SUBSTITUTIONS = 50

    def __init__(self, records: list[Record], train: bool = False, seed: int = 0, flip: bool = True):
        self.records, self.train, self.seed, self.flip = records, train, seed, flip
        self._bad = multiprocessing.Array("b", len(records), lock=False)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_skipped(self) -> int:
        return int(np.frombuffer(self._bad, dtype=np.int8).sum())

    def _load(self, j: int) -> torch.Tensor | None:
        if self._bad[j]:
            return None
        try:
            img = _pil_loader(self.records[j].path)
        except Exception as e:  # noqa: BLE001 - any decoding failure means "skip this file"
            self._bad[j] = 1
            log.warning("skipping unreadable image %s (%s: %s)", self.records[j].path, type(e).__name__, str(e)[:120])
            return None
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        img = self._load(index)
        if img is None and not self.train:
            return torch.zeros(3, 32, 32), {"unreadable": True}, index
        for k in range(1, min(len(self.records), self.MAX_SUBSTITUTIONS)):
            if img is not None:
                break
            img = self._load((index + k) % len(self.records))
            if img is not None:
                index = (index + k) % len(self.records)
        if img is None:
            raise UserError(f"{self.MAX_SUBSTITUTIONS} unreadable images in a row from {self.records[index].path} on")
        r = self.records[index]
        boxes = torch.from_numpy(r.boxes.copy())
        if self.train and self.flip and np.random.default_rng(augmentation_seed(self.seed, epoch, index)).random() < 0.5:
            img = img.flip(-1)
            boxes = torch.stack([img.shape[-1] - boxes[:, 2], boxes[:, 1], img.shape[-1] - boxes[:, 0], boxes[:, 3]], 1)
        return img, {"boxes": boxes, "labels": torch.from_numpy(r.labels.copy())}, index


def collate(batch):
    images, targets, index = zip(*batch)
    return list(images), list(targets), list(index)


class IterationSampler(Sampler):
    """Detectron2's infinite ``TrainingSampler`` made resumable: a stream of permutations (epoch e
    shuffled as :class:`EpochSampler` with ``seed + e``); global batch ``k`` is stream positions
    ``[k·B·W, (k+1)·B·W)`` and rank ``r`` reads its ``r``-th slice of ``B``. Started at iteration
    ``start_iter`` it continues exactly where an uninterrupted run would be. Yields ``(index, epoch)``."""

    def __init__(self, n: int, batch_per_process: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 start_iter: int = 0):
        self.n, self.b, self.w, self.rank, self.seed, self.start_iter = n, batch_per_process, world_size, rank, seed, start_iter

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.b * self.w
        pos = self.start_iter * g + self.rank * self.b
        epoch, order = -1, []
        while True:
            for p in range(pos, pos + self.b):
                e = p // self.n
                if e != epoch:
                    epoch = e
                    s = EpochSampler(self.n, 1, 0, shuffle=True, seed=self.seed)
                    s.set_epoch(e)
                    order = s.order()
                yield order[p % self.n], e
            pos += g
