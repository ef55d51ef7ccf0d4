"""A generated VOC devkit folder for tests and smoke runs: noise images holding coloured shapes with
their boxes (``cat``: a red rectangle, ``dog``: a blue ellipse; every third image also holds a small
grey ``cat`` marked difficult).

    python -c "from src.detection.synthetic import make_voc_detection; make_voc_detection('data/voc_tiny')"
    DETECTRON2_DATASETS=data/voc_tiny python detection/train_torchvision.py ... DATASETS.TRAIN "('voc_2007_trainval',)"
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

SHAPES = {"cat": ((220, 40, 40), "rectangle"), "dog": ((40, 80, 230), "ellipse")}


def _objects(rng: np.random.Generator, size: int, i: int) -> list[tuple[str, list[int], bool]]:
    """(class, [x0, y0, x1, y1] inclusive pixels, difficult) of image ``i``."""
    objs = []
    names = ["cat", "dog"] if i % 2 else ["dog", "cat"]
    for k, name in enumerate(names[: 1 + (i % 3 != 0)]):
        s = int(rng.integers(size // 4, size // 2))
        half = size // 2
        x0 = int(rng.integers(k * half, k * half + half - s + 1)) if size - s > 0 else 0
        y0 = int(rng.integers(0, size - s))
        objs.append((name, [x0, y0, x0 + s - 1, y0 + s - 1], False))
    if i % 3 == 0:
        s = size // 8
        x0 = int(rng.integers(size // 2, size - s))
        objs.append(("cat", [x0, size - s - 2, x0 + s - 1, size - 3], True))
    return objs


def make_voc_detection(root: str, n_trainval: int = 6, n_test: int = 4, size: int = 80, seed: int = 0) -> str:
    """Write ``root/VOC2007/{JPEGImages, Annotations, ImageSets/Main/{trainval,test}.txt}``; returns ``root``.
    XML boxes are 1-based inclusive pixel indices, as in VOC."""
    voc = os.path.join(root, "VOC2007")
    for d in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, d), exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = {"trainval": [f"{i:06d}" for i in range(n_trainval)],
           "test": [f"{i:06d}" for i in range(n_trainval, n_trainval + n_test)]}
    for split, names in ids.items():
        for img_id in names:
            i = int(img_id)
            img = Image.fromarray(rng.integers(60, 140, (size, size, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(img)
            xml = []
            for name, (x0, y0, x1, y1), difficult in _objects(rng, size, i):
                colour, shape = ((150, 150, 150), "rectangle") if difficult else SHAPES[name]
                (draw.rectangle if shape == "rectangle" else draw.ellipse)([x0, y0, x1, y1], fill=colour)
                xml.append(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox>"
                           f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax>"
                           "</bndbox></object>")
            img.save(os.path.join(voc, "JPEGImages", f"{img_id}.jpg"), quality=95)
            with open(os.path.join(voc, "Annotations", f"{img_id}.xml"), "w") as f:
                f.write(f"<annotation><filename>{img_id}.jpg</filename><size><width>{size}</width>"
                        f"<height>{size}</height><depth>3</depth></size>{''.join(xml)}</annotation>")
        with open(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    return root
