"""PCL's maths against slow references written from disco_pcl_evals.md B3/B4 (loops, numpy), and the
k-means wrapper against faiss's own ``Kmeans``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.errors import UserError
from src.methods.pcl import (PCL, check_pcl_setup, parse_num_cluster, proto_nce_loss, sample_negatives)
from src.methods.pcl_cluster import cluster_all, concentration, normalize_rows, run_kmeans


# ----------------------------------------------------------------------------- ProtoNCE (B3)
def ref_proto_loss(q, index, im2cluster, centroids, density, neg_ids) -> float:
    """B3 with loops: columns [C[p_1..p_N], C[neg_1..neg_r]], ℓ_ij = q_i·c_j / φ_j, CE with target i."""
    cols = [int(im2cluster[int(i)]) for i in index] + [int(j) for j in neg_ids]
    total = 0.0
    for i in range(q.shape[0]):
        logits = [sum(float(q[i, d]) * float(centroids[c, d]) for d in range(q.shape[1])) / float(density[c])
                  for c in cols]
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
        total += lse - logits[i]
    return total / q.shape[0]


def test_proto_nce_matches_loop_reference_with_fixed_clustering():
    g = torch.Generator().manual_seed(0)
    K, dim, n_data, N, r = 12, 5, 30, 6, 4
    q = F.normalize(torch.randn(N, dim, generator=g), dim=1)
    centroids = F.normalize(torch.randn(K, dim, generator=g), dim=1)
    density = 0.1 + torch.rand(K, generator=g) * 0.3
    im2cluster = torch.randint(0, K, (n_data,), generator=g)
    index = torch.tensor([0, 3, 3, 7, 11, 20])  # a duplicate image: duplicate positive columns
    pos = im2cluster[index]
    neg = sample_negatives(pos, K, r, torch.rand(K, generator=g))
    loss, logits = proto_nce_loss(q, pos, neg, centroids, density)
    assert logits.shape == (N, N + r)
    assert loss.item() == pytest.approx(ref_proto_loss(q, index, im2cluster, centroids, density, neg), rel=1e-5)


def test_negatives_exclude_batch_positives_and_reach_the_last_id():
    pos = torch.tensor([0, 2, 2, 5])
    seen = set()
    for s in range(200):
        keys = torch.rand(10, generator=torch.Generator().manual_seed(s))
        neg = sample_negatives(pos, 8, 3, keys)  # ids 0..7 (the largest assigned id is 7)
        ids = neg.tolist()
        assert len(set(ids)) == 3 and not set(ids) & {0, 2, 5} and max(ids) < 8
        seen.update(ids)
    assert seen == {1, 3, 4, 6, 7}  # uniform over the rest, the last id included (D2.2)


def test_pcl_forward_total_loss_is_instance_plus_mean_of_proto_losses():
    torch.manual_seed(0)
    m = PCL("resnet18", 16, [10, 12], dim=8, r=4, T=0.2, warmup_epoch=1)
    m.eval()  # BN with running stats: the key encoder's output does not depend on the batch
    for i, k in enumerate([10, 12]):
        im2c, cen, phi = m.clustering(i)
        im2c.copy_(torch.arange(16) % k)
        cen.copy_(F.normalize(torch.randn(k, 8), dim=1))
        phi.copy_(0.1 + torch.rand(k))
        getattr(m, f"num_ids_{i}").fill_(k)
    m.cluster_epoch.fill_(1)
    x = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    idx = torch.tensor([1, 5, 9, 14])
    m.on_epoch_start(0)
    out0 = m(x, idx)
    assert "loss_proto" not in out0 and out0["loss"].item() == pytest.approx(out0["loss_inst"].item())

    class Ctx:  # a mid-epoch resume: the E-step is skipped, the clustering stays
        resumed_mid_epoch = True
    m.on_epoch_start(1, Ctx())
    state = torch.get_rng_state()
    out = m(x, idx)
    torch.set_rng_state(state)
    keys = [torch.rand(1, k)[0] for k in (10, 12)]
    q = F.normalize(m.encoder_q(x[0]), dim=1)
    proto = [ref_proto_loss(q.detach(), idx, *m.clustering(i), sample_negatives(m.clustering(i)[0][idx], k, 4, keys[i]))
             for i, k in enumerate([10, 12])]
    assert out["loss_proto"].item() == pytest.approx(sum(proto) / 2, rel=1e-4)
    assert out["loss"].item() == pytest.approx(out["loss_inst"].item() + sum(proto) / 2, rel=1e-5)


def test_setup_errors_are_one_line():
    with pytest.raises(UserError, match=r"--pcl-r 8 must be smaller than K - N = 12 - 4"):
        check_pcl_setup(8, [20, 12], 4, 100)
    with pytest.raises(UserError, match=r"asks for 200 clusters but the training set has 100 images"):
        check_pcl_setup(8, [200], 4, 100)
    with pytest.raises(UserError, match="comma-separated"):
        parse_num_cluster("25k")
    with pytest.raises(UserError, match="at least 16 images"):
        run_kmeans(np.zeros((10, 4), np.float32), 16, 0)


# ----------------------------------------------------------------------------- φ (B4)
def ref_concentration(D, I, k, tau, alpha=10.0):
    """B4 with per-cluster lists, as the official numpy code reads."""
    members = [[] for _ in range(k)]
    for d, c in zip(D, I):
        members[int(c)].append(d)
    phi = np.zeros(k)
    for c, ds in enumerate(members):
        if len(ds) > 1:
            phi[c] = (np.asarray(ds, dtype=np.float32) ** 0.5).mean() / np.log(len(ds) + alpha)
    dmax = phi.max()
    for c, ds in enumerate(members):
        if len(ds) <= 1:
            phi[c] = dmax
    phi = phi.clip(np.percentile(phi, 10), np.percentile(phi, 90))
    return (tau * phi / phi.mean()).astype(np.float32)


def test_concentration_matches_numpy_reference_singletons_clipping_rescale():
    rng = np.random.default_rng(0)
    k = 30
    # one empty and one singleton cluster (they take the largest φ), the others of 2..9 members; one
    # far-out cluster so that the P90 clip bites below the maximum
    sizes = [0, 1] + [int(v) for v in rng.integers(2, 10, size=k - 2)]
    I = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)]).astype(np.int64)
    D = rng.uniform(0.01, 0.5, size=I.shape[0]).astype(np.float32)
    D[I == 10] *= 40
    phi = concentration(D, I, k, tau=0.2)
    ref = ref_concentration(D, I, k, 0.2)
    np.testing.assert_allclose(phi, ref, rtol=1e-5)
    assert phi.dtype == np.float32 and phi.mean() == pytest.approx(0.2, rel=1e-5)
    assert phi[0] == phi[1] == phi[10] == phi.max()  # singleton and empty: the max, then clipped like it
    assert (phi == phi.max()).sum() >= 3 and (phi == phi.min()).sum() >= 3  # both clips bite


def test_concentration_needs_a_cluster_with_two_members():
    with pytest.raises(UserError, match="at most one member"):
        concentration(np.ones(3, np.float32), np.array([0, 1, 2]), 3, 0.2)


# ----------------------------------------------------------------------------- k-means (faiss)
def test_kmeans_wrapper_reproduces_faiss_kmeans():
    import faiss
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    for seed, k in enumerate([5, 9]):
        ours = run_kmeans(x, k, seed)
        ref = faiss.Kmeans(8, k, niter=20, nredo=5, seed=seed, max_points_per_centroid=1000,
                           min_points_per_centroid=10)
        ref.train(x)
        np.testing.assert_array_equal(ours.centroids, ref.centroids)
        D, I = ref.index.search(x, 1)
        np.testing.assert_array_equal(ours.assign, I[:, 0])
        np.testing.assert_allclose(ours.dist, D[:, 0], rtol=1e-6, atol=1e-6)
    # the seed is the position of K: another seed gives other centroids
    assert not np.array_equal(run_kmeans(x, 5, 0).centroids, run_kmeans(x, 5, 1).centroids)


def test_cluster_all_normalises_centroids_after_phi():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 6)).astype(np.float32)
    (assign, cen, phi), = cluster_all(x, [7], 0.3)
    km = run_kmeans(x, 7, 0)
    np.testing.assert_array_equal(assign, km.assign)
    np.testing.assert_allclose(cen, normalize_rows(km.centroids), rtol=1e-6)
    np.testing.assert_allclose(phi, ref_concentration(km.dist, km.assign, 7, 0.3), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cen, axis=1), 1, rtol=1e-5)


# ----------------------------------------------------------------------------- a stop inside the E-step
def test_stop_inside_epoch_start_hook_checkpoints_the_epoch_start(tmp_path):
    """A stop signal while ``on_epoch_start`` runs (PCL's E-step feature pass raises StopRequested):
    the engine writes checkpoint_interrupted at (epoch, 0), returns, and the next run runs the hook
    again and ends identical to an uninterrupted run."""
    import os
    import signal
    from src.checkpoint import load_checkpoint
    from src.engine import StopRequested
    from tests.test_engine import Tiny, _same_state, _trainer

    class Clustering(Tiny):
        stop_at = None

        def on_epoch_start(self, epoch, ctx=None):
            super().on_epoch_start(epoch, ctx)
            if epoch == self.stop_at:
                os.kill(os.getpid(), signal.SIGUSR1)
                if ctx.should_stop():
                    raise StopRequested()
            self.memory.add_(epoch)  # per-epoch state written by the hook

    from src.engine import seed_everything
    seed_everything(0)
    _trainer(tmp_path / "ref", method=Clustering()).fit()
    seed_everything(0)
    m = Clustering()
    m.stop_at = 1
    res = _trainer(tmp_path / "run", method=m).fit()
    assert res == {"interrupted": 1.0, "next_iter": 0.0}
    ck = load_checkpoint(str(tmp_path / "run" / "checkpoint_interrupted.pth.tar"))
    assert (ck["epoch"], ck["iter"]) == (1, 0)
    t = _trainer(tmp_path / "run", method=Clustering())
    t.fit()
    assert t.method.epochs_started[0] == (1, False)  # the hook runs again (no mid-epoch resume)
    _same_state(load_checkpoint(str(tmp_path / "ref" / "checkpoint_0002.pth.tar")),
                load_checkpoint(str(tmp_path / "run" / "checkpoint_0002.pth.tar")))
