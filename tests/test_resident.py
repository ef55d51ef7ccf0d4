"""The GPU-resident data path (src/data/resident.py, ``EngineConfig.data_on_device``), on CPU tensors:
the DataLoader path's (index, target) sequence for the same sampler state, a mid-epoch resume that
ends identical to an uninterrupted run, and the one-line refusal of datasets read from files."""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader

from src.data.cifar import CifarDataset
from src.data.datasets import (
    EpochSampler,
    ImageDataset,
    augmentation_seed,
    collate_crops,
)
from src.data.resident import in_memory_images, resident_loader
from src.data.transforms import TwoCropsTransform, moco_v2_augmentation
from src.distributed import DistInfo
from src.engine import CheckpointPolicy, EngineConfig, Trainer, seed_everything
from src.errors import UserError
from src.methods.moco import MoCo
from tests.test_engine import _write_cifar10


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> CifarDataset:
    root = str(tmp_path_factory.mktemp("cifar"))
    _write_cifar10(root, n=8)  # 5 batches × 8 = 40 training images
    return CifarDataset(root, "cifar10", True, TwoCropsTransform(moco_v2_augmentation(32)), seed=4)


def test_resident_loader_follows_the_dataloader_sequence(cifar):
    """Both ranks of a 2-process split, a full epoch and one resumed after 18 images: the same
    batches of (index, target) as the DataLoader path; every view of image i in epoch e is the device
    pipeline of that image alone seeded with augmentation_seed(dataset seed, e, i)."""
    cpu = torch.device("cpu")
    for rank in (0, 1):
        s_ref, s_dev = EpochSampler(40, 2, rank, seed=9), EpochSampler(40, 2, rank, seed=9)
        ref = DataLoader(cifar, batch_size=6, sampler=s_ref, collate_fn=collate_crops, drop_last=True)
        dev = resident_loader(cifar, s_dev, 6, cpu)
        for epoch, consumed in ((3, 0), (4, 18)):
            s_ref.set_epoch(epoch, consumed)
            s_dev.set_epoch(epoch, consumed)
            a = [(t.tolist(), i.tolist()) for _, t, i in ref]
            batches = list(dev)
            assert len(dev) == len(ref) == len(a) == (3 if consumed == 0 else 1)
            assert [(t.tolist(), i.tolist()) for _, t, i in batches] == a
            crops, _, index = batches[-1]
            assert [c.shape for c in crops] == [(6, 3, 32, 32)] * 2 and crops[0].dtype == torch.float32
            one = torch.from_numpy(cifar.data[int(index[3])])[None]
            alone = dev.pipeline(one, augmentation_seed(4, epoch, index[3:4]))
            assert all(torch.allclose(c[3], v[0], atol=1e-5) for c, v in zip(crops, alone))
    s = EpochSampler(40, 1, 0, seed=9)
    s.set_epoch(0)
    assert [i for _, _, idx in resident_loader(cifar, s, 8, cpu) for i in idx.tolist()] == s.indices()


def test_data_on_device_refuses_datasets_read_from_files(tiny_folder, tmp_path, capsys):
    """An ImageFolder with --data_on_device: one line, exit 2 (the flag is wired through
    src.cli.engine_config into every script)."""
    with pytest.raises(UserError, match="ImageDataset reads its images from files"):
        in_memory_images(ImageDataset(os.path.join(tiny_folder, "train")))
    import main_moco
    argv = ["-a", "resnet18", "--epochs", "1", "-b", "8", "--moco-k", "64", "--image_size", "32", "-j", "0",
            "--data_on_device", "--output_dir", str(tmp_path / "out"), tiny_folder]
    with pytest.raises(SystemExit) as e:
        main_moco.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: --data_on_device needs a dataset held in memory")


def _moco_trainer(ds, out, fire_at=None) -> Trainer:
    seed_everything(0)
    m = MoCo("resnet18", 16, 32, 0.99, 0.2, True)
    seen = []
    orig = m.forward

    def forward(crops, index=None):
        seen.append((index.tolist(), [c.shape[-1] for c in crops], float(crops[0].mean())))
        if fire_at is not None and len(seen) == fire_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return orig(crops, index)
    m.forward = forward
    m.seen = seen
    cfg = EngineConfig(1, 8, str(out), CheckpointPolicy(str(out)), "moco", "resnet18", workers=0, max_iters=2,
                       stop_check_every=1, print_freq=1, data_on_device=True)
    return Trainer(m, torch.optim.SGD(m.trainable_parameters(), 0.03, momentum=0.9), lambda e, i, n: 0.03, ds, cfg,
                   DistInfo())


def test_moco_trains_through_the_resident_path_and_resumes_exactly(cifar, tmp_path):
    """MoCo (ResNet-18) for 2 iterations through the resident path: the method sees the sampler's
    indices with device-augmented 32-px views and learns (the two views of an image are far closer
    than the random queue: loss below chance, log(1 + K)); a run stopped by SIGUSR1 after its 1st
    step and resumed ends with the uninterrupted run's weights and queue."""
    ref = _moco_trainer(cifar, tmp_path / "ref")
    assert ref.loader.__class__.__name__ == "ResidentLoader"
    res = ref.fit()
    s = EpochSampler(40, 1, 0, seed=0)
    order = s.indices()
    assert [x[0] for x in ref.method.seen] == [order[0:8], order[8:16]]
    assert all(x[1] == [32, 32] and abs(x[2]) < 1.5 for x in ref.method.seen) and 0.01 < res["loss"] < math.log(33) - 1
    run = tmp_path / "run"
    assert _moco_trainer(cifar, run, fire_at=1).fit() == {"interrupted": 1.0, "next_iter": 1.0}
    resumed = _moco_trainer(cifar, run)
    resumed.fit()
    assert resumed.resumed_from.endswith("checkpoint_interrupted.pth.tar")
    assert [x[0] for x in resumed.method.seen] == [order[8:16]]
    a, b = ref.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stl10_is_read_whole_for_the_resident_path(tmp_path):
    """STL-10 (memory-mapped, column-major on disk) gives the resident path its whole pretraining split
    (train then unlabeled) as upright N×96×96×3 uint8, image for image what the CPU path decodes."""
    import numpy as np

    from src.data.stl10 import Stl10Dataset
    from tests.small_data import write_stl10
    written = write_stl10(str(tmp_path), n_train=3, n_test=2, n_unlabeled=4)
    ds = Stl10Dataset(str(tmp_path), "train+unlabeled")
    arr = in_memory_images(ds)
    assert arr.shape == (7, 96, 96, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr, np.concatenate([written["train"][0], written["unlabeled"][0]]))
    assert all(np.array_equal(arr[i], ds.image_array(i)) for i in range(7))


def test_small_preset_runs_as_the_same_ops_on_the_device(tmp_path):
    """The small-image preset's two-crop transform (as main_moco builds it for --dataset cifar10) and its
    device twin: RRC scale (0.08, 1) at 32 px, no blur, the CIFAR mean/std."""
    import argparse

    from src.cli import moco_two_crops
    from src.data import small
    from src.data.gpu_pipeline import device_pipeline
    from tests.small_data import write_cifar10
    write_cifar10(str(tmp_path))
    args = argparse.Namespace(dataset="cifar10", small_images=False, image_size=224, arch="resnet18",
                              cifar_stem=False, aug_plus=True, explicit_flags=[], knn_protocol="default")
    small.apply_presets(args, str(tmp_path))
    assert args.image_size == 32 and args.cifar_stem
    view = device_pipeline(moco_two_crops(args)).describe()
    assert len(view) == 2 and view[0] == view[1]
    ops = {d[0]: d[1:] for d in view[0]}
    assert ops["crop"][:2] == ((32, 32), (0.08, 1.0)) and "blur" not in ops
    assert ops["normalize"] == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert [d[0] for d in view[0]] == ["crop", "jitter", "gray", "flip", "normalize"]
