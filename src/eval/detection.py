"""Detection AP: Detectron2's ``PascalVOCDetectionEvaluator`` and COCO through pycocotools
(disco_pcl_evals.md C5, D3.4).

VOC (per class, per IoU threshold t in 0.50, 0.55, …, 0.95):
- detections of the class over all images, by decreasing score (stable order for ties);
- each is matched to the ground-truth box of the class in its image with the highest IoU; IoU > t
  (strictly): a true positive if that box is not difficult and not matched yet, a false positive if it
  was matched already, ignored (neither) if it is difficult; IoU ≤ t (or no box): a false positive;
- recall = TP / (non-difficult boxes), precision = TP / (TP + FP) cumulated along the ranking;
- AP = the VOC07 11-point metric ``mean over r in {0, 0.1, …, 1} of max(precision at recall >= r)``
  (Detectron2 uses it for the 2007 test set) or the area under the monotone precision envelope (2012).
AP50 and AP75 are the class means at 0.5 and 0.75, AP the mean over the ten thresholds; in percent.
Boxes are 0-based ``[x1 - 1, y1 - 1, x2, y2]`` (as the data module reads them) and IoU is the
continuous one, which is exactly Detectron2's "+1" pixel IoU on the 1-based coordinates it writes.
Classes without a non-difficult box in the set are left out of the means (Detectron2 would give NaN).
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence

import numpy as np

log = logging.getLogger("ssl")
IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))


def ap_from_pr(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """AP of a precision/recall curve (recall non-decreasing): VOC07 11-point or the area under the
    monotone precision envelope, evaluated at every change of recall."""
    rec, prec = np.asarray(rec, np.float64), np.asarray(prec, np.float64)
    if use_07_metric:
        return float(np.mean([prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.maximum.accumulate(np.concatenate([[0.0], prec, [0.0]])[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N×4) with every box of ``b`` (M×4), ``xyxy`` continuous coordinates."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def best_overlaps(image_ids: np.ndarray, scores: np.ndarray, boxes: np.ndarray,
                  gt: Mapping[object, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class: the ranking (decreasing score, stable), and for every ranked detection the IoU and
    index of the best-overlapping ground-truth box of its image (IoU -1 when the image has none)."""
    order = np.argsort(-scores, kind="stable")
    iou, idx = np.full(len(order), -1.0), np.zeros(len(order), np.int64)
    for rank, i in enumerate(order):
        g = gt.get(image_ids[i])
        if g is not None and len(g[0]):
            ious = box_iou(boxes[i:i + 1], g[0])[0]
            idx[rank] = int(np.argmax(ious))
            iou[rank] = ious[idx[rank]]
    return order, iou, idx


def match_detections(ranked_ids: Sequence, iou: np.ndarray, idx: np.ndarray,
                     gt: Mapping[object, tuple[np.ndarray, np.ndarray]], iou_thresh: float
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """``(tp, fp, npos)`` along the ranking at one IoU threshold (module docstring);
    ``gt[image] = (boxes, difficult)``."""
    npos = int(sum(int((~d).sum()) for _, d in gt.values()))
    tp, fp = np.zeros(len(iou)), np.zeros(len(iou))
    used = {k: np.zeros(len(b), bool) for k, (b, _) in gt.items()}
    for rank, (img, o, j) in enumerate(zip(ranked_ids, iou.tolist(), idx.tolist())):
        if o <= iou_thresh:
            fp[rank] = 1
        elif not gt[img][1][j]:  # a difficult box: neither true nor false positive
            if used[img][j]:
                fp[rank] = 1
            else:
                tp[rank], used[img][j] = 1, True
    return tp, fp, npos


def class_aps(image_ids, scores, boxes, gt, thresholds: Sequence[float], use_07_metric: bool) -> list[float] | None:
    """AP of one class at each threshold; None when the class has no non-difficult box."""
    scores, boxes = np.asarray(scores, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
    order, iou, idx = best_overlaps(np.asarray(image_ids, dtype=object), scores, boxes, gt)
    ranked = [image_ids[i] for i in order]
    out = []
    for t in thresholds:
        tp, fp, npos = match_detections(ranked, iou, idx, gt, t)
        if npos == 0:
            return None
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        out.append(ap_from_pr(ctp / npos, ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps), use_07_metric))
    return out


def voc_evaluate(predictions: Mapping[int, Mapping[str, np.ndarray]], records: Sequence, classes: Sequence[str],
                 use_07_metric: bool = True) -> dict:
    """``predictions[i]`` = ``{"boxes", "scores", "labels"}`` (labels 1..K) for image ``records[i]``
    (``boxes``, ``labels``, ``difficult``). Returns AP, AP50, AP75 (percent) and the per-class AP50."""
    per_iou: dict[float, list[float]] = {t: [] for t in IOU_THRESHOLDS}
    per_class = {}
    for c, name in enumerate(classes, start=1):
        gt = {i: (r.boxes[r.labels == c].astype(np.float64), r.difficult[r.labels == c]) for i, r in enumerate(records)}
        ids, sc, bx = [], [], []
        for i, p in predictions.items():
            keep = np.asarray(p["labels"]) == c
            ids += [i] * int(keep.sum())
            sc.append(np.asarray(p["scores"])[keep])
            bx.append(np.asarray(p["boxes"]).reshape(-1, 4)[keep])
        sc = np.concatenate(sc) if sc else np.zeros(0)
        bx = np.concatenate(bx) if bx else np.zeros((0, 4))
        aps = class_aps(ids, sc, bx, gt, IOU_THRESHOLDS, use_07_metric)
        if aps is None:
            continue
        for t, ap in zip(IOU_THRESHOLDS, aps):
            per_iou[t].append(100.0 * ap)
        per_class[name] = 100.0 * aps[0]
    if not per_class:
        raise ValueError("no class has a non-difficult ground-truth box in the evaluation set")
    means = {t: float(np.mean(v)) for t, v in per_iou.items()}
    return {"AP": float(np.mean(list(means.values()))), "AP50": means[0.5], "AP75": means[0.75],
            "per_class_AP50": per_class, "classes_evaluated": len(per_class),
            "metric": "VOC07 11-point" if use_07_metric else "area under the precision envelope"}


def coco_evaluate(predictions: Mapping[int, Mapping[str, np.ndarray]], records: Sequence, coco_json: str,
                  category_ids: Sequence[int]) -> dict:
    """pycocotools ``COCOeval`` (bbox) on the images of ``records``: AP, AP50, AP75, APs, APm, APl (percent)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gt = COCO(coco_json)
    results = []
    for i, p in predictions.items():
        for (x1, y1, x2, y2), s, c in zip(np.asarray(p["boxes"]).reshape(-1, 4).tolist(), np.asarray(p["scores"]).tolist(),
                                          np.asarray(p["labels"]).tolist()):
            results.append({"image_id": records[i].image_id, "category_id": int(category_ids[int(c) - 1]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not results:
        log.warning("COCO evaluation: no detection at all, every AP is 0")
        return {k: 0.0 for k in keys}
    with contextlib.redirect_stdout(out):
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds = sorted({r.image_id for r in records})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.info("pycocotools:\n%s", out.getvalue().strip())
    return {k: float(100.0 * v) if v >= 0 else float("nan") for k, v in zip(keys, ev.stats[:6])}
