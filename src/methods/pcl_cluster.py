"""PCL's E-step maths: faiss k-means and the prototype concentration φ (disco_pcl_evals.md B4, D2.4-7).

Pure functions on numpy arrays; :class:`src.methods.pcl.PCL` runs them on rank 0 and broadcasts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError

#: faiss parameters of the official E-step (B4)
NITER, NREDO, MAX_POINTS, MIN_POINTS = 20, 5, 1000, 10
ALPHA = 10.0


@dataclass
class KMeansResult:
    centroids: np.ndarray   # K×d float32, raw (not normalised) faiss centroids
    dist: np.ndarray        # N float32, squared L2 distance of each point to its centroid
    assign: np.ndarray      # N int64, cluster id of each point


def _flat_index(d: int, gpu: int | None):
    """``GpuIndexFlatL2`` (float32, ``useFloat16=False``) when a GPU build of faiss and a GPU are
    there and ``gpu`` is given, else the CPU ``IndexFlatL2``."""
    import faiss
    if gpu is not None and hasattr(faiss, "GpuIndexFlatL2") and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        cfg.device = int(gpu)
        index = faiss.GpuIndexFlatL2(res, d, cfg)
        index._res = res  # keep the resources alive as long as the index
        return index
    return faiss.IndexFlatL2(d)


def run_kmeans(x: np.ndarray, k: int, seed: int, gpu: int | None = None, verbose: bool = False) -> KMeansResult:
    """faiss k-means of ``x`` (N×d) into ``k`` clusters: ``niter`` 20, ``nredo`` 5 (best objective
    kept), ``seed``, max/min 1000/10 points per centroid, Euclidean (not spherical); then every
    point's nearest centroid and its squared distance (``index.search(x, 1)``)."""
    import faiss
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise UserError(f"k-means with {k} clusters needs at least {k} images; the training set has {n} "
                        "(lower --num-cluster)")
    clus = faiss.Clustering(d, k)
    clus.niter, clus.nredo, clus.seed = NITER, NREDO, int(seed)
    clus.max_points_per_centroid, clus.min_points_per_centroid = MAX_POINTS, MIN_POINTS
    clus.verbose = verbose
    index = _flat_index(d, gpu)
    clus.train(x, index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d).astype(np.float32)
    search = _flat_index(d, gpu)
    search.add(centroids)
    dist, assign = search.search(x, 1)
    return KMeansResult(centroids, dist[:, 0].astype(np.float32), assign[:, 0].astype(np.int64))


def concentration(dist: np.ndarray, assign: np.ndarray, k: int, tau: float, alpha: float = ALPHA) -> np.ndarray:
    """φ of every cluster (B4, D2.4), float32 of length ``k``:

    - Z > 1 members: φ_c = mean_z sqrt(D_z) / ln(Z + α), D the squared distance to the raw centroid;
    - Z ≤ 1 (singletons and empty clusters): the largest φ of the Z > 1 clusters;
    - clip to [P10, P90] (linear-interpolation percentiles over the k values);
    - rescale to mean τ: φ ← τ·φ / mean(φ).
    """
    counts = np.bincount(assign, minlength=k)
    sums = np.bincount(assign, weights=np.sqrt(dist.astype(np.float32)).astype(np.float64), minlength=k)
    multi = counts > 1
    if not multi.any():
        raise UserError(f"every one of the {k} clusters has at most one member: the concentration is undefined "
                        "(fewer clusters or more images)")
    phi = np.zeros(k, dtype=np.float64)
    phi[multi] = sums[multi] / counts[multi] / np.log(counts[multi] + alpha)
    phi[~multi] = phi[multi].max()
    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))
    mean = phi.mean()
    if not mean > 0:  # every member sits on its centroid (duplicate images)
        raise UserError(f"all {k} clusters have zero spread: the concentration is undefined (duplicate images?)")
    return (tau * phi / mean).astype(np.float32)


def normalize_rows(c: np.ndarray) -> np.ndarray:
    """L2-normalise the centroids (after φ was computed on the raw ones)."""
    return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cluster_all(x: np.ndarray, num_cluster: list[int], tau: float, gpu: int | None = None,
                verbose: bool = False) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """B4 for every K of ``--num-cluster`` (seed = position of K): ``(im2cluster, normalised centroids,
    φ)`` per clustering."""
    out = []
    for seed, k in enumerate(num_cluster):
        km = run_kmeans(x, k, seed, gpu, verbose)
        phi = concentration(km.dist, km.assign, k, tau)
        out.append((km.assign, normalize_rows(km.centroids), phi))
    return out


def cluster_or_stop(x: np.ndarray, num_cluster: list[int], tau: float, gpu: int | None = None,
                    verbose: bool = False, stop_received=None, poll_s: float = 0.2):
    """:func:`cluster_all` in a helper thread (faiss releases the GIL) while this thread polls the
    local ``stop_received()`` every ``poll_s`` seconds: a k-means of ImageNet size takes minutes, and
    a stop signal must checkpoint within seconds. Returns ``(results, False)``, or ``(None, True)``
    when a stop was received first: the clustering is abandoned (its daemon thread ends with the
    process) and redone from the epoch's start on resume."""
    import threading
    if stop_received is None:
        return cluster_all(x, num_cluster, tau, gpu, verbose), False
    box: dict = {}

    def run() -> None:
        try:
            box["out"] = cluster_all(x, num_cluster, tau, gpu, verbose)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            box["err"] = e
    worker = threading.Thread(target=run, name="pcl-kmeans", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(poll_s)
        if worker.is_alive() and stop_received():
            return None, True
    if "err" in box:
        raise box["err"]
    return box["out"], False
