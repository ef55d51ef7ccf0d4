"""The kNN monitor: weighted kNN top-1/top-5 of the method's backbone features, bank = training
images (eval transform), queries = validation images, run between epochs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from .. import distributed as D
from ..eval.features import extract_features
from ..eval.knn import knn_accuracy


@dataclass
class KnnMonitor:
    bank: Dataset
    queries: Dataset
    num_classes: int
    #: epoch (0-based) -> run after it? None: every ``knn_freq`` epochs and after the last
    schedule: Callable[[int], bool] | None = None
    #: called with (epoch, top-1) on every rank; may raise UserError (a collapse guard) or warn
    check: Callable[[int, float], None] | None = None
    k: int = 20
    t: float = 0.2
    batch_size: int = 256
    workers: int = 4

    def due(self, epoch: int, epochs: int, knn_freq: int) -> bool:
        if self.schedule is not None:
            return self.schedule(epoch)
        return bool(knn_freq) and ((epoch + 1) % knn_freq == 0 or epoch + 1 == epochs)

    def run(self, method, device: torch.device, channels_last: bool = False,
            should_stop: Callable[[], bool] | None = None) -> tuple[float, float]:
        """Collective. BN running statistics are averaged over ranks first (only them), so every
        rank embeds with the same network. ``should_stop`` is polled between batches (raises
        :class:`~src.engine.hooks.StopRequested`)."""
        D.sync_bn_stats_(method)
        net = method.backbone()
        kw = dict(channels_last=channels_last, should_stop=should_stop)
        fb, yb = extract_features(net, self.bank, self.batch_size, self.workers, device, gather=False, **kw)
        fq, yq = extract_features(net, self.queries, self.batch_size, self.workers, device, **kw)
        return knn_accuracy(fb, yb, fq, yq, self.num_classes, self.k, self.t, sharded=True)
