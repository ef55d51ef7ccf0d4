"""Per-class linear SVMs and all-points AP (disco_pcl_evals.md C1). numpy and scikit-learn only, so the
parallel workers that fit the classes start fast (no torch import)."""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from .detection import ap_from_pr

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """x / (‖x‖ + 1e-5), the official normalisation."""
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


def voc_ap(scores: np.ndarray, target: np.ndarray) -> float:
    """All-points AP of one class: positives are ``target > 0`` (difficult 0 and −1 are negatives)."""
    order = np.argsort(-scores, kind="stable")
    tp = (target[order] > 0).astype(np.float64)
    npos = tp.sum()
    if npos == 0:
        return float("nan")
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    return ap_from_pr(ctp / npos, ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps))


def fit_and_score(cls: int, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  cost: float) -> float:
    """One class: LinearSVC with C1's settings on labels where difficult (0) became −1; test AP."""
    from sklearn.svm import LinearSVC
    y = np.where(train_y[:, cls] > 0, 1, -1)
    if len(np.unique(y)) < 2:
        raise UserError(f"class {CLASSES[cls]} has only {'positive' if y[0] > 0 else 'negative'} training "
                        "images: the SVM needs both")
    svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, penalty="l2", loss="squared_hinge", dual=True,
                    tol=1e-4, max_iter=2000, intercept_scaling=1.0, random_state=0)
    svm.fit(train_x, y)
    return voc_ap(svm.decision_function(test_x), np.where(test_y[:, cls] > 0, 1, -1))


def svm_map(train_x, train_y, test_x, test_y, cost: float, jobs: int = 1) -> tuple[float, list[float]]:
    """mAP (× 100) over the 20 classes (fitted in ``jobs`` parallel threads) and the per-class APs."""
    if jobs > 1:
        from joblib import Parallel, delayed
        aps = Parallel(n_jobs=jobs, prefer="threads")(delayed(fit_and_score)(c, train_x, train_y, test_x, test_y, cost)
                                    for c in range(len(CLASSES)))
    else:
        aps = [fit_and_score(c, train_x, train_y, test_x, test_y, cost) for c in range(len(CLASSES))]
    return 100.0 * float(np.nanmean(aps)), [float(a) for a in aps]
