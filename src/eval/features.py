"""Feature extraction on frozen networks, sharded over ranks and gathered in dataset order."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import distributed as D
from ..data.datasets import ShardSampler, collate_crops

#: batches between two stop polls inside a feature pass
STOP_POLL_EVERY = 10


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    sampler = ShardSampler(len(dataset), D.get_world_size(), D.get_rank())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_crops,
                      generator=torch.Generator().manual_seed(0))  # keeps the global RNG untouched


def _common_batches(n: int, batch_size: int) -> int:
    """Batches that every rank runs (the last rank's shard is the smallest): stop polls, which are
    collective, happen only among those."""
    w = D.get_world_size()
    return math.ceil((n // w) / batch_size) if n >= w else 0


@torch.no_grad()
def extract_features(net: nn.Module, dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                     normalize: bool = True, channels_last: bool = False, gather: bool = True,
                     should_stop: Callable[[], bool] | None = None,
                     desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N×D, L2-normalised if ``normalize``) and targets of every image of ``dataset``, in
    dataset order, on every rank. Targets may be class indices or per-image vectors (multi-label,
    e.g. VOC's {-1, 0, 1} per class); their shape and dtype are kept. ``gather=False``: only this
    rank's shard (images r, r+W, ...), for a sharded kNN bank. ``net`` is put in eval mode and
    restored afterwards. ``should_stop`` (collective) is polled every :data:`STOP_POLL_EVERY`
    batches and raises :class:`~src.engine.hooks.StopRequested`. ``desc``: show a progress bar
    (rank 0) with that title."""
    from ..engine.hooks import StopRequested
    was_training = net.training
    net.eval()
    feats, labels, idxs = [], [], []
    mf = torch.channels_last if channels_last else torch.contiguous_format
    common = _common_batches(len(dataset), batch_size)
    loader = make_eval_loader(dataset, batch_size, workers, device)
    if desc is not None:
        from tqdm import tqdm
        loader = tqdm(loader, desc=desc, disable=D.get_rank() != 0, dynamic_ncols=True, mininterval=1.0)
    try:
        for b, (x, y, idx) in enumerate(loader):
            if should_stop is not None and b < common and (b + 1) % STOP_POLL_EVERY == 0 and should_stop():
                raise StopRequested()
            f = net(x.to(device, non_blocking=True, memory_format=mf)).float()
            feats.append(F.normalize(f, dim=1) if normalize else f)
            labels.append(y.to(device))
            idxs.append(idx.to(device))
    finally:
        net.train(was_training)
    if feats:
        f, y, i = torch.cat(feats), torch.cat(labels), torch.cat(idxs)
    else:  # an empty shard: shapes from one item
        x0, y0, _ = dataset[0]
        was = net.training
        net.eval()
        dim = int(net(x0.unsqueeze(0).to(device)).shape[1])
        net.train(was)
        y0 = torch.as_tensor(y0)
        f = torch.zeros(0, dim, device=device)
        y = torch.zeros(0, *y0.shape, dtype=y0.dtype if y0.ndim else torch.long, device=device)
        i = torch.zeros(0, dtype=torch.long, device=device)
    if not gather:
        return f, y
    f, y, i = D.gather_variable(f), D.gather_variable(y), D.gather_variable(i)
    out_f = torch.empty(len(dataset), f.shape[1], device=device)
    out_y = torch.empty(len(dataset), *y.shape[1:], dtype=y.dtype, device=device)
    out_f[i], out_y[i] = f, y
    return out_f, out_y
