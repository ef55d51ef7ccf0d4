"""PCL: MoCo with a queue of ``r`` keys plus ProtoNCE over k-means prototypes (disco_pcl_evals.md B2-B5, D2).

Per step (B3): the InfoNCE loss of MoCo and, from ``warmup_epoch`` on, for every clustering m of
``--num-cluster``, a prototype loss whose columns are the batch's own positive prototypes followed by
``r`` negative prototypes sampled without replacement from the other cluster ids; the logits are
divided by the prototypes' concentrations φ. E-step (B4) at the start of every such epoch: features
of the momentum encoder (with its head, eval mode, BN statistics averaged over ranks, centre crop)
over the whole training set, faiss k-means on rank 0, broadcast; the result lives in buffers.
"""
from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed as D
from ..errors import UserError
from ..models.momentum import momentum_update_, shuffle_bn_forward
from .moco import MoCo, moco_loss
from .base import topk_accuracy

log = logging.getLogger("ssl")


def sample_negatives(pos_ids: torch.Tensor, num_ids: int, r: int, keys: torch.Tensor) -> torch.Tensor:
    """``r`` cluster ids drawn uniformly without replacement from ``range(num_ids)`` minus the
    batch's positive ids (B3; D2.1-2: every id up to the largest assigned one can be drawn).
    ``keys`` are ``num_ids`` uniform draws: the ``r`` smallest keys outside the positives win, which
    is a uniform subset and consumes the same randomness whatever the batch (resumable RNG streams)."""
    keys = keys[:num_ids].clone()
    keys[pos_ids] = float("inf")
    return keys.topk(r, largest=False, sorted=False).indices


def proto_logits(q: torch.Tensor, pos_ids: torch.Tensor, neg_ids: torch.Tensor, centroids: torch.Tensor,
                 density: torch.Tensor) -> torch.Tensor:
    """ℓ_ij = (q_i · c_j) / φ_j over the columns ``[C[p_1..p_N], C[neg_1..neg_r]]`` (N + r columns;
    duplicate positives stay separate columns). The target of row i is column i."""
    ids = torch.cat([pos_ids, neg_ids])
    return q @ centroids[ids].t() / density[ids]


def proto_nce_loss(q: torch.Tensor, pos_ids: torch.Tensor, neg_ids: torch.Tensor, centroids: torch.Tensor,
                   density: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``CE(proto_logits, arange(N))`` and the logits."""
    logits = proto_logits(q, pos_ids, neg_ids, centroids, density)
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)), logits


def parse_num_cluster(s: str) -> list[int]:
    try:
        ks = [int(v) for v in str(s).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--num-cluster must be comma-separated integers, got {s!r}") from None
    if not ks or min(ks) < 2:
        raise UserError(f"--num-cluster needs at least one number of clusters >= 2, got {s!r}")
    return ks


def check_pcl_setup(r: int, num_cluster: list[int], per_process_batch: int, num_images: int) -> None:
    """B7 / D2.6: ``r < K − N`` for every K (N: per-process batch), and at least K images."""
    if r < 1:
        raise UserError(f"--pcl-r must be positive, got {r}")
    for k in num_cluster:
        if k > num_images:
            raise UserError(f"--num-cluster asks for {k} clusters but the training set has {num_images} images")
        if not r < k - per_process_batch:
            raise UserError(f"--pcl-r {r} must be smaller than K - N = {k} - {per_process_batch} = "
                            f"{k - per_process_batch} (K: each --num-cluster, N: batch per process); "
                            "lower --pcl-r or raise --num-cluster")


class PCL(MoCo):
    """MoCo (queue of ``r`` keys, temperature τ) + ProtoNCE. Buffers per clustering m:
    ``im2cluster_m`` (N_data), ``centroids_m`` (K_m × dim, L2-normalised), ``density_m`` (φ, K_m);
    ``cluster_epoch``: the epoch whose E-step produced them (−1: none yet)."""

    def __init__(self, arch: str, num_samples: int, num_cluster: list[int], dim: int = 128, r: int = 16384,
                 m: float = 0.999, T: float = 0.2, mlp: bool = False, warmup_epoch: int = 20,
                 cifar_stem: bool = False, shuffle_groups: int = 1):
        super().__init__(arch, dim, r, m, T, mlp, -1, cifar_stem=cifar_stem, shuffle_groups=shuffle_groups)
        self.r, self.num_cluster, self.warmup_epoch = r, list(num_cluster), warmup_epoch
        for i, k in enumerate(self.num_cluster):
            self.register_buffer(f"im2cluster_{i}", torch.zeros(num_samples, dtype=torch.long))
            self.register_buffer(f"centroids_{i}", torch.zeros(k, dim))
            self.register_buffer(f"density_{i}", torch.ones(k))
            self.register_buffer(f"num_ids_{i}", torch.zeros((), dtype=torch.long))
        self.register_buffer("cluster_epoch", torch.full((), -1, dtype=torch.long))
        self.use_proto = False
        self._num_ids: list[int] = []  # host copies of num_ids_m (no device sync per step)
        self.eval_set, self.eval_batch_size, self.eval_workers = None, 64, 0
        self.kmeans_verbose = False

    def set_eval_data(self, dataset, batch_size: int, workers: int) -> None:
        """The E-step's dataset: the training images with the centre-crop transform, same indices."""
        if len(dataset) != self.im2cluster_0.shape[0]:
            raise ValueError(f"E-step dataset has {len(dataset)} images, the method was built for "
                             f"{self.im2cluster_0.shape[0]}")
        self.eval_set, self.eval_batch_size, self.eval_workers = dataset, batch_size, workers

    def clustering(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return getattr(self, f"im2cluster_{i}"), getattr(self, f"centroids_{i}"), getattr(self, f"density_{i}")

    # ------------------------------------------------------------------ E-step
    def on_epoch_start(self, epoch: int, ctx=None) -> None:
        self.use_proto = epoch >= self.warmup_epoch
        if not self.use_proto:
            return
        if ctx is not None and ctx.resumed_mid_epoch and int(self.cluster_epoch) == epoch:
            log.info("epoch %d: resumed mid-epoch, clustering restored from the checkpoint (no E-step)", epoch)
        else:
            self.e_step(epoch, getattr(ctx, "should_stop", None), getattr(ctx, "stop_received", None))
        self._num_ids = [int(getattr(self, f"num_ids_{i}")) for i in range(len(self.num_cluster))]

    @torch.no_grad()
    def compute_features(self, should_stop=None) -> torch.Tensor:
        """n(encoder_k(x)) of every training image (centre crop, eval mode) in dataset order, on
        every rank. A copy of the key encoder with BN statistics averaged over ranks is used, so the
        features are the same everywhere and the training state is untouched."""
        from ..eval.features import extract_features
        if self.eval_set is None:
            raise RuntimeError("PCL.set_eval_data() was not called")
        net = copy.deepcopy(self.encoder_k)
        D.sync_bn_stats_(net)
        feats, _ = extract_features(net, self.eval_set, self.eval_batch_size, self.eval_workers,
                                    self.queue.device, normalize=True, should_stop=should_stop,
                                    desc="E-step features")
        return feats

    @torch.no_grad()
    def e_step(self, epoch: int, should_stop=None, stop_received=None) -> None:
        """Features of every image, then k-means on rank 0. ``should_stop`` (collective) is polled in
        the feature pass, ``stop_received`` (local) during rank 0's k-means; a stop in either raises
        :class:`~src.engine.hooks.StopRequested` on every rank (the engine checkpoints the epoch's start)."""
        t0 = time.time()
        feats = self.compute_features(should_stop)
        t1 = time.time()
        results, msg, stopped = None, "", False
        if D.get_rank() == 0:
            from .pcl_cluster import cluster_or_stop
            dev = feats.device
            try:
                results, stopped = cluster_or_stop(feats.cpu().numpy(), self.num_cluster, self.T,
                                                   gpu=dev.index if dev.type == "cuda" else None,
                                                   verbose=self.kmeans_verbose, stop_received=stop_received)
            except UserError as e:
                msg = str(e)
        if D.any_rank(stopped):
            from ..engine.hooks import StopRequested
            log.warning("epoch %d: k-means abandoned after %.1f s for the stop signal", epoch, time.time() - t1)
            raise StopRequested()
        D.agree(not msg, msg)
        for i in range(len(self.num_cluster)):
            bufs = self.clustering(i)
            if results is not None:
                for b, v in zip(bufs, results[i]):
                    b.copy_(torch.from_numpy(np.ascontiguousarray(v)).to(b.device, b.dtype))
            for b in bufs:
                D.broadcast_(b, 0)
            nb = getattr(self, f"num_ids_{i}")
            nb.copy_(bufs[0].max() + 1)
        self.cluster_epoch.fill_(epoch)
        sizes = ", ".join(f"K={k}: {int(getattr(self, f'num_ids_{i}'))} ids used"
                          for i, k in enumerate(self.num_cluster))
        log.info("epoch %d E-step: features %.1f s, k-means %.1f s (%s)", epoch, t1 - t0, time.time() - t1, sizes)

    # ------------------------------------------------------------------ M-step
    def forward(self, crops: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        im_q, im_k = crops[0], crops[1]
        negs = []
        if self.use_proto:
            if not self._num_ids:
                raise RuntimeError("ProtoNCE without a clustering: on_epoch_start was not run")
            if index is None:
                raise ValueError("PCL needs the dataset index of every image")
            n = index.shape[0]
            for num_ids, k in zip(self._num_ids, self.num_cluster):
                if num_ids - n < self.r:  # random.sample would fail in the official code too
                    raise UserError(f"k-means with K={k} assigned only the ids below {num_ids}: fewer than "
                                    f"--pcl-r {self.r} + batch {n} prototypes to sample negatives from; "
                                    "lower --pcl-r or raise --num-cluster")
            # the negatives are drawn before the key forward: the same draws on every rank
            W, rank = D.get_world_size(), D.get_rank()
            for i in range(len(self.num_cluster)):
                im2c, cen, _ = self.clustering(i)
                n_ids = cen.shape[0]
                keys = torch.rand(W, n_ids, device=cen.device)[rank]
                negs.append(sample_negatives(im2c[index], self._num_ids[i], self.r, keys))
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            momentum_update_(self.encoder_k, self.encoder_q, self.m)
            k = F.normalize(shuffle_bn_forward(self.encoder_k, im_k, self.shuffle_groups), dim=1)
        q = q.float()
        loss, logits = moco_loss(q, k.float(), self.queue.clone().detach(), self.T)
        self._dequeue_and_enqueue(k)
        zero = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        out = {"loss_inst": loss.detach(), "acc_inst": topk_accuracy(logits, zero, ks=(1,))[0]}
        if negs:
            arange = torch.arange(q.shape[0], device=q.device)
            proto_losses, accs = [], []
            for i, neg in enumerate(negs):
                im2c, cen, phi = self.clustering(i)
                lp, pl = proto_nce_loss(q, im2c[index], neg, cen, phi)
                proto_losses.append(lp)
                accs.append(topk_accuracy(pl, arange, ks=(1,))[0])
            loss_proto = torch.stack(proto_losses).mean()
            loss = loss + loss_proto
            out["loss_proto"], out["acc_proto"] = loss_proto.detach(), torch.stack(accs).mean()
        out["loss"] = loss
        return out
