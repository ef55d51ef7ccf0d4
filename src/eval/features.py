"""Feature extraction on frozen networks, sharded over ranks and gathered in dataset order."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import distributed as D
from ..data.datasets import ShardSampler, collate_crops


def make_eval_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    sampler = ShardSampler(len(dataset), D.get_world_size(), D.get_rank())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", collate_fn=collate_crops,
                      generator=torch.Generator().manual_seed(0))  # keeps the global RNG untouched


@torch.no_grad()
def extract_features(net: nn.Module, dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                     normalize: bool = True, channels_last: bool = False, gather: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N×D, L2-normalised if ``normalize``) and labels of every image of ``dataset``, in
    dataset order, on every rank. ``gather=False``: only this rank's shard (images r, r+W, ...),
    for a sharded kNN bank. ``net`` is put in eval mode and restored afterwards."""
    was_training = net.training
    net.eval()
    feats, labels, idxs = [], [], []
    mf = torch.channels_last if channels_last else torch.contiguous_format
    for x, y, idx in make_eval_loader(dataset, batch_size, workers, device):
        f = net(x.to(device, non_blocking=True, memory_format=mf)).float()
        feats.append(F.normalize(f, dim=1) if normalize else f)
        labels.append(y.to(device))
        idxs.append(idx.to(device))
    dim = feats[0].shape[1] if feats else _probe_dim(net, dataset, device)
    f = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    i = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.long, device=device)
    if not gather:
        net.train(was_training)
        return f, y
    f, y, i = D.gather_variable(f), D.gather_variable(y), D.gather_variable(i)
    out_f = torch.empty(len(dataset), f.shape[1], device=device)
    out_y = torch.empty(len(dataset), dtype=torch.long, device=device)
    out_f[i], out_y[i] = f, y
    net.train(was_training)
    return out_f, out_y


def _probe_dim(net: nn.Module, dataset: Dataset, device: torch.device) -> int:
    x, _, _ = dataset[0]
    return int(net(x.unsqueeze(0).to(device)).shape[1])
