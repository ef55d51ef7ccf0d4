"""The GPU-resident data path for small in-memory datasets (CIFAR-10/100, STL-10): no DataLoader.

The whole uint8 dataset (``N × H × W × 3``, e.g. :attr:`CifarDataset.data`) is copied to the device
once. Per batch, :class:`ResidentLoader` takes the next ``batch_size`` positions of the engine's
:class:`~src.data.datasets.EpochSampler` (so ``set_epoch(epoch, consumed)``, the rank split and a
mid-epoch resume behave exactly as with the DataLoader), gathers those images on the device and
runs the device twin of the dataset's own transform (:func:`~src.data.gpu_pipeline.device_pipeline`)
seeded per image with ``augmentation_seed(seed, epoch, index)``. It yields ``(crops, targets,
index)`` like the DataLoader path: ``crops`` a list of ``B × 3 × h × w`` float views (already on the
device), ``targets`` and ``index`` CPU int64 tensors. Selected by ``EngineConfig.data_on_device``
(``--data_on_device``); see docs/architecture.md.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..errors import UserError
from .datasets import EpochSampler, augmentation_seed
from .gpu_pipeline import DevicePipeline, device_pipeline


class ResidentLoader:
    """Batches of device-augmented views of a device-resident uint8 dataset, in the sampler's order
    (``drop_last`` as the training DataLoader)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, sampler: EpochSampler, batch_size: int,
                 pipeline: DevicePipeline, seed: int = 0, drop_last: bool = True):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 N×H×W×3, got {images.dtype} {tuple(images.shape)}")
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.int64).cpu()
        self.sampler, self.batch_size, self.pipeline, self.seed, self.drop_last = \
            sampler, batch_size, pipeline, seed, drop_last

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, index: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        """The augmented views of the images ``index`` (CPU or device int64) in ``epoch``."""
        idx = index.to(self.device, non_blocking=True)
        x = self.images.index_select(0, idx).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        return self.pipeline(x, augmentation_seed(self.seed, epoch, idx))

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        pairs = list(self.sampler)                       # (index, epoch), the DataLoader's requests
        order = torch.tensor([i for i, _ in pairs], dtype=torch.int64)
        epoch = pairs[0][1] if pairs else self.sampler.epoch
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.batch(index, epoch), self.targets[index], index


def in_memory_images(dataset) -> np.ndarray | torch.Tensor:
    """The dataset's uint8 ``N × H × W × 3`` array (``dataset.data``, or read whole by
    ``dataset.uint8_images()`` for a memory-mapped one such as STL-10), or one clear error line."""
    data = dataset.uint8_images() if hasattr(dataset, "uint8_images") else getattr(dataset, "data", None)
    ok = data is not None and getattr(data, "ndim", 0) == 4 and data.shape[-1] == 3 and \
        str(data.dtype) in ("uint8", "torch.uint8") and len(getattr(dataset, "targets", ())) == len(data)
    if not ok:
        raise UserError(f"--data_on_device needs a dataset held in memory as uint8 N×H×W×3 images (CIFAR-10/100, "
                        f"STL-10); {type(dataset).__name__} reads its images from files: drop the flag")
    return data


def resident_loader(dataset, sampler: EpochSampler, batch_size: int, device: torch.device,
                    seed: int | None = None) -> ResidentLoader:
    """A :class:`ResidentLoader` for an in-memory dataset whose ``transform`` is a reference transform
    (``TwoCropsTransform`` / ``MultiCropTransform`` / ``T.Compose`` of :mod:`src.data.transforms`);
    ``seed`` defaults to the dataset's own augmentation seed, so the CPU and device paths seed image
    i of epoch e alike."""
    data = in_memory_images(dataset)
    if getattr(dataset, "transform", None) is None:
        raise UserError("--data_on_device: the training set has no transform to run on the device")
    pipeline = device_pipeline(dataset.transform)
    images = torch.as_tensor(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).to(device)
    seed = getattr(dataset, "seed", 0) if seed is None else seed
    return ResidentLoader(images, torch.as_tensor(dataset.targets), sampler, batch_size, pipeline, seed)
