"""Datasets, samplers and transforms.

The dataset contract (every dataset the engine, the kNN monitor, feature extraction or an
evaluation reads follows it):

- ``dataset[i]`` and ``dataset[(i, epoch)]`` both work. ``i`` is the position in a fixed, sorted
  sample list; the training sampler (:class:`~src.data.datasets.EpochSampler`) yields
  ``(i, epoch)`` so the dataset can seed the augmentation of image ``i`` in ``epoch`` with
  :func:`~src.data.datasets.augmentation_seed` (seed, epoch, i) alone — identical whatever the number
  of loader workers or processes, and on resume.
- An item is ``(crops, target, index)``: ``crops`` a tensor or a list of tensors (one per view,
  e.g. ``TwoCropsTransform``, ``MultiCropTransform``), ``target`` an int class or a tensor (a
  multi-label vector such as VOC's {-1, 0, 1} per class), ``index`` = ``i``, the stable key of
  per-sample state (SogCLR's ``u``, PCL's cluster ids, gathered features).
- Attributes: ``classes`` (names), ``targets``; optional ``num_skipped`` (unreadable images
  replaced by the next readable one, counted, never fatal).
- :func:`~src.data.datasets.collate_crops` batches items into (list of B×C×H×W views, targets, index).
- Device-side batch transforms (:mod:`src.data.device_transforms`) receive the same seeds; the
  device twins of the augmentation presets are built by :mod:`src.data.gpu_pipeline` from the ops
  of :mod:`src.data.gpu_aug`, and :mod:`src.data.resident` serves in-memory datasets (``.data``
  uint8 N×H×W×3) from the device without a DataLoader (``EngineConfig.data_on_device``).

Readers: :class:`~src.data.datasets.ImageDataset` (ImageFolder, file lists, first-N classes),
:class:`~src.data.cifar.CifarDataset` (CIFAR-10/100 python batches), :class:`~src.data.stl10.Stl10Dataset`
(STL-10 binaries), :mod:`src.data.builtin` (sklearn digits and generated folders for the demo and the
tests). :mod:`src.data.small` maps ``--dataset`` to them and holds the small-image preset.
"""
