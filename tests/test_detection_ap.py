"""Detection AP (src/eval/detection.py; disco_pcl_evals.md C5) against hand-computed cases, and COCO AP
through pycocotools on a tiny generated annotation file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from src.detection.data import Record, load_coco
from src.eval import detection as E


def _rec(boxes, labels, difficult=None) -> Record:
    n = len(boxes)
    return Record("x.jpg", np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64),
                  np.array(difficult or [False] * n, bool))


def test_ap_from_pr_by_hand():
    # ranks: TP, FP, (difficult: nothing), FP, TP with 2 positives
    rec = np.array([0.5, 0.5, 0.5, 0.5, 1.0])
    prec = np.array([1.0, 0.5, 0.5, 1 / 3, 0.5])
    # 11-point: recall thresholds 0..0.5 (6 points) see max precision 1, 0.6..1.0 (5 points) see 0.5
    assert E.ap_from_pr(rec, prec, use_07_metric=True) == pytest.approx(8.5 / 11)
    # envelope: 1.0 on (0, 0.5], 0.5 on (0.5, 1]
    assert E.ap_from_pr(rec, prec) == pytest.approx(0.75)
    assert E.ap_from_pr(np.array([1.0]), np.array([1.0]), True) == 1.0
    assert E.ap_from_pr(np.zeros(0), np.zeros(0), True) == 0.0


def test_matching_rules_by_hand():
    gt = {0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([False, True])),
          1: (np.array([[0, 0, 10, 10]], float), np.array([False]))}
    ids = [0, 0, 0, 1, 1]
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    boxes = np.array([[0, 0, 10, 10],    # TP (IoU 1)
                      [0, 0, 10, 10],    # the same box again: FP
                      [20, 20, 30, 30],  # the difficult box: neither TP nor FP
                      [0, 0, 10, 5],     # IoU exactly 0.5: not > 0.5, FP
                      [0, 0, 10, 9]], float)  # IoU 0.9: TP up to a threshold of 0.85
    order, iou, idx = E.best_overlaps(np.array(ids, dtype=object), scores, boxes, gt)
    assert order.tolist() == [0, 1, 2, 3, 4] and iou.tolist() == pytest.approx([1, 1, 1, 0.5, 0.9])
    tp, fp, npos = E.match_detections(ids, iou, idx, gt, 0.5)
    assert npos == 2 and tp.tolist() == [1, 0, 0, 0, 1] and fp.tolist() == [0, 1, 0, 1, 0]
    tp, fp, _ = E.match_detections(ids, iou, idx, gt, 0.9)
    assert tp.tolist() == [1, 0, 0, 0, 0] and fp.tolist() == [0, 1, 0, 1, 1]
    aps = E.class_aps(ids, scores, boxes, gt, E.IOU_THRESHOLDS, use_07_metric=True)
    # thresholds 0.50 .. 0.85: TP FP - FP TP  → 8.5/11; 0.90, 0.95: TP FP - FP FP → 6/11
    assert aps == pytest.approx([8.5 / 11] * 8 + [6 / 11] * 2)
    # ties keep the given order (stable): the second of two equal scores is the duplicate
    order, _, _ = E.best_overlaps(np.array([0, 0], dtype=object), np.array([0.5, 0.5]), boxes[:2], gt)
    assert order.tolist() == [0, 1]


def test_voc_evaluate_means_over_classes_and_thresholds():
    records = [_rec([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 60, 60]], [1, 1, 2], [False, True, False]),
               _rec([[0, 0, 10, 10]], [1])]
    preds = {0: {"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 60, 60], [1, 1, 5, 5]]),
                 "scores": np.array([0.9, 0.8, 0.7, 0.95, 0.3]), "labels": np.array([1, 1, 1, 2, 3])},
             1: {"boxes": np.array([[0, 0, 10, 5], [0, 0, 10, 9]]), "scores": np.array([0.6, 0.5]),
                 "labels": np.array([1, 1])}}
    r = E.voc_evaluate(preds, records, ["cat", "dog", "bird"])
    cat = (8 * 8.5 / 11 + 2 * 6 / 11) / 10
    assert r["classes_evaluated"] == 2  # "bird" has no ground truth: left out of the means
    assert r["per_class_AP50"] == pytest.approx({"cat": 100 * 8.5 / 11, "dog": 100.0})
    assert r["AP50"] == pytest.approx(50 * (8.5 / 11 + 1)) and r["AP75"] == r["AP50"]
    assert r["AP"] == pytest.approx(50 * (cat + 1))
    area = E.voc_evaluate(preds, records, ["cat", "dog", "bird"], use_07_metric=False)
    assert area["AP50"] == pytest.approx(50 * (0.75 + 1))


def test_svm_ap_shares_the_envelope():
    from src.eval.svm import voc_ap
    assert voc_ap(np.array([0.9, 0.8, 0.7, 0.6, 0.1]), np.array([1, -1, 0, 1, -1])) == pytest.approx(0.75)


def test_coco_evaluate_with_pycocotools(tmp_path):
    data = {"images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 100},
                       {"id": 9, "file_name": "b.jpg", "width": 100, "height": 100}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [50, 50, 30, 40], "area": 1200, "iscrowd": 0},
                            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 1},
                            {"id": 4, "image_id": 9, "category_id": 1, "bbox": [20, 20, 40, 40], "area": 1600, "iscrowd": 0}]}
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(data))
    info = load_coco(str(path), str(tmp_path), "coco_2017_val")
    assert info.classes == ["dog", "cat"] and info.category_ids == [1, 3]  # contiguous labels follow the category ids
    assert [r.image_id for r in info.records] == [7, 9]
    assert info.records[1].labels.tolist() == [1]  # the crowd box is not a training box
    assert info.records[0].boxes.tolist() == [[10, 10, 50, 40], [50, 50, 80, 90]]
    perfect = {i: {"boxes": r.boxes, "scores": np.ones(len(r.boxes)), "labels": r.labels} for i, r in enumerate(info.records)}
    res = E.coco_evaluate(perfect, info.records, info.coco_json, info.category_ids)
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    shifted = {0: perfect[0], 1: {"boxes": perfect[1]["boxes"] + 10, "scores": np.ones(1), "labels": perfect[1]["labels"]}}
    worse = E.coco_evaluate(shifted, info.records, info.coco_json, info.category_ids)
    assert worse["AP"] < 100.0 and set(worse) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
