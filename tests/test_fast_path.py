"""The fast data path (src/data/fast_path.py, ``--fast_aug``): workers crop and flip into uint8, the
device runs the rest. Against the all-device twin (same random numbers: same views up to uint8
rounding), against the PIL reference (same distributions), determinism per seed, the engine wiring,
and a short MoCo run whose loss trajectory is that of the reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp

from src.data import transforms as R
from src.data.datasets import ImageDataset, augmentation_seed
from src.data.fast_path import WorkerCrops, install, split_transform
from src.data.gpu_pipeline import device_pipeline
from src.distributed import DistInfo
from src.engine import CheckpointPolicy, EngineConfig, Trainer, seed_everything
from src.errors import UserError
from src.methods.moco import MoCo
from tests.test_gpu_aug import _picture, view_statistics


def _multicrop(size: int = 24, small: int = 12):
    """The LORAC / SwAV multi-crop reference at small sizes: 2 global + 2 local crops."""
    return R.MultiCropTransform([size, small], [2, 2], [0.14, 0.05], [1.0, 0.14])


def test_worker_half_then_device_half_is_the_device_pipeline():
    """Worker crops (PIL resized_crop, uint8) + device half = the all-device pipeline on the decoded
    image, view for view (same crop boxes and flips, same colour draws), within PIL's uint8
    rounding amplified by the jitter and the normalisation. Identical for the same seed."""
    for ref in (R.moco_v2_augmentation(16), _multicrop()):
        ref = ref if isinstance(ref, R.MultiCropTransform) else R.TwoCropsTransform(ref)
        worker, photo = split_transform(ref)
        img = Image.fromarray(_picture(32))
        seeds = augmentation_seed(3, 1, torch.arange(6))
        crops = [worker(img, int(s)) for s in seeds]
        assert all(c.dtype == torch.uint8 and c.shape[0] == 3 for views in crops for c in views)
        assert all(torch.equal(a, b) for a, b in zip(crops[0], worker(img, int(seeds[0]))))
        batch = [torch.stack([c[v] for c in crops]) for v in range(len(crops[0]))]
        fast = photo(batch, seeds)
        whole = device_pipeline(ref)(torch.from_numpy(_picture(32)).permute(2, 0, 1)[None].expand(6, -1, -1, -1), seeds)
        assert [f.shape for f in fast] == [w.shape for w in whole]
        for f, w in zip(fast, whole):
            # PIL rounds to uint8 twice (≤ 1.01/255), brightness × contrast up to ~2, / std 0.225: ≤ 0.1
            assert (f - w).abs().amax() < 0.1 and (f - w).abs().mean() < 0.01
        assert not torch.equal(crops[0][0], crops[1][0])   # another image seed, another crop


def test_worker_crops_resample_as_pil():
    """A crop that is the whole image (scale 1, the image's own ratio): the worker's uint8 view equals
    PIL's bilinear resize of the image, flipped when the draw says so, within one grey level."""
    from torchvision import transforms as T
    img = Image.fromarray(_picture(32)[:24])                      # 32×24: ratio 4/3
    t = T.Compose([T.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3)), T.RandomHorizontalFlip()])
    worker, _ = split_transform(t)
    pil = torch.from_numpy(np.array(img.resize((16, 16), Image.BILINEAR))).permute(2, 0, 1).int()
    flips = []
    for seed in range(8):
        (v,) = worker(img, seed)
        flipped = (v.int() - pil.flip(-1)).abs().max() <= 1
        assert flipped or (v.int() - pil).abs().max() <= 1
        flips.append(bool(flipped))
    assert 0 < sum(flips) < 8


def test_fast_path_matches_the_pil_reference_statistically():
    """The multi-crop preset on one picture: 400 PIL-reference outputs against 400 fast-path outputs
    (global and local views): grayscale fraction near 0.2, and the distributions of per-view mean,
    std, red−blue balance, left−right balance and total variation agree (KS < 0.12)."""
    ref_t = _multicrop()
    worker, photo = split_transform(ref_t)
    img = Image.fromarray(_picture(32))
    n = 400
    ds_ref = [ImageDataset.__new__(ImageDataset)]
    ds_ref[0].transform, ds_ref[0].seed = ref_t, 0
    ref = [ds_ref[0]._seeded_transform(img, 0, i) for i in range(n)]
    seeds = augmentation_seed(0, 1, torch.arange(n))
    crops = [worker(img, int(s)) for s in seeds]
    fast = photo([torch.stack([c[v] for c in crops]) for v in range(4)], seeds)
    for v in (0, 2):   # a global and a local view
        g_ref, s_ref = view_statistics(torch.stack([r[v] for r in ref]), R.SWAV_STD, 2e-3)
        g_fast, s_fast = view_statistics(fast[v], R.SWAV_STD, 2e-3)
        assert abs(g_ref - 0.2) < 0.06 and abs(g_fast - 0.2) < 0.06
        for a, b in zip(s_ref, s_fast):
            assert ks_2samp(a.numpy(), b.numpy()).statistic < 0.12


def test_install_follows_the_flag(tiny_folder):
    """auto on CPU and off keep the reference; on switches the dataset to the worker half and
    returns the device half; a transform without a device twin: auto keeps the reference, on is
    refused in one line."""
    cpu = torch.device("cpu")
    ds = ImageDataset(f"{tiny_folder}/train", R.TwoCropsTransform(R.moco_v2_augmentation(16)))
    assert install(ds, "auto", cpu) is None and install(ds, "off", cpu) is None
    assert isinstance(ds.transform, R.TwoCropsTransform)
    photo = install(ds, "on", cpu)
    assert isinstance(ds.transform, WorkerCrops) and len(photo) == 2
    worker = ds.transform
    assert install(ds, "on", cpu) is photo and ds.transform is worker   # a second Trainer on the same dataset
    crops, target, index = ds[(3, 0)]
    assert [c.dtype for c in crops] == [torch.uint8] * 2 and index == 3
    assert all(torch.equal(a, b) for a, b in zip(crops, ds[(3, 0)][0])) and not torch.equal(crops[0], ds[(3, 1)][0][0])
    plain = ImageDataset(f"{tiny_folder}/train", R.eval_transform(16))
    assert install(plain, "auto", torch.device("cuda")) is None and not isinstance(plain.transform, WorkerCrops)
    with pytest.raises(UserError, match="^--fast_aug on: device augmentation: Resize has no device-side"):
        install(plain, "on", cpu)


def _moco_run(folder: str, out, fast: str, seed: int) -> tuple[list[float], torch.Tensor]:
    """Per-step losses, and the per-channel mean and std of every view the method was given."""
    seed_everything(0)
    m = MoCo("resnet18", 16, 32, 0.99, 0.2, True)
    views = []
    forward = m.forward
    m.forward = lambda crops, index=None: (views.extend(c.detach() for c in crops), forward(crops, index))[1]
    ds = ImageDataset(f"{folder}/train", R.TwoCropsTransform(R.moco_v2_augmentation(32)), seed=seed)
    cfg = EngineConfig(2, 8, str(out), CheckpointPolicy(str(out)), "moco", "resnet18", workers=0, print_freq=1,
                       seed=seed, fast_aug=fast)
    t = Trainer(m, torch.optim.SGD(m.trainable_parameters(), 0.03, momentum=0.9), lambda e, i, n: 0.03, ds, cfg,
                DistInfo())
    assert (t.batch_transform is not None) == (fast == "on")
    losses = []
    orig = t.step.__call__

    class Spy:
        def __call__(self, *a, **kw):
            out = orig(*a, **kw)
            losses.append(float(out[0]["loss"]))
            return out
    t.step = Spy()
    t.fit()
    x = torch.cat(views)
    return losses, torch.stack([x.mean((0, 2, 3)), x.std((0, 2, 3))])


def test_training_through_the_fast_path_follows_the_reference(tiny_folder, tmp_path):
    """MoCo (ResNet-18, 32 px, batch 8, K=16, 8 steps) through the fast path and the reference. The two
    paths draw their augmentations from different random numbers, so a fast run is another sample of
    the same random process, like a reference run with another augmentation seed (and data order):
    step for step, the fast run's losses must stay as close to the reference's as that other seed's
    do (mean absolute gap at most twice the other seed's, plus 0.05 nat), and the views it is given have
    the reference's per-channel mean and std (within 0.15: 256 views of 32 images). The shape is MoCo's: low
    while the queue holds random keys, rising towards log(1 + K) once it holds the batch's keys."""
    (ref, ref_in), (other, _) = _moco_run(tiny_folder, tmp_path / "ref", "off", 0), \
        _moco_run(tiny_folder, tmp_path / "other", "off", 1)
    fast, fast_in = _moco_run(tiny_folder, tmp_path / "fast", "on", 0)
    # the method sees normalised, colour-augmented float views either way (per-channel mean and std)
    assert (fast_in - ref_in).abs().max() < 0.15, (ref_in, fast_in)
    assert len(ref) == len(other) == len(fast) == 8
    gap = lambda a, b: float(np.mean(np.abs(np.subtract(a, b))))  # noqa: E731
    assert gap(fast, ref) <= 2 * gap(other, ref) + 0.05, (ref, other, fast)
    for run in (ref, fast):
        assert run[0] < np.mean(run[-4:]) and abs(np.mean(run[-4:]) - math.log(17)) < 0.5


def test_benchmark_data_script_measures_both_paths(tmp_path, capsys):
    """scripts/benchmark_data.py on 3 generated 500×375 JPEGs: one table row per preset, with the rates
    of both paths, their ratio and the device half's cost, from the same run."""
    import re

    from scripts.benchmark_data import main, make_jpegs
    make_jpegs(str(tmp_path), 3)
    assert Image.open(tmp_path / "train" / "c0" / "00000.jpg").size == (500, 375)
    main(["--data", str(tmp_path), "--images", "3", "--repeats", "1", "--device_batch", "4"])
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| LORAC") or r.startswith("| MoCo v2")]
    assert len(rows) == 2, out
    for r in rows:
        ref, fast, ratio = (float(x) for x in re.findall(r"\| ([\d.]+)×? ", r)[:3])
        assert ref > 0 and fast > 0 and abs(ratio - fast / ref) < 0.1 * ratio + 0.05
    assert re.search(r"≥ 5× (PASS|FAIL)", rows[0]) and rows[0].endswith("(cpu) |")


def _fast_trainer(folder: str, out, fire_at=None) -> Trainer:
    import os
    import signal
    seed_everything(0)
    m = MoCo("resnet18", 16, 32, 0.99, 0.2, True)
    forward, calls = m.forward, []

    def spy(crops, index=None):
        calls.append(index.tolist())
        if fire_at is not None and len(calls) == fire_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return forward(crops, index)
    m.forward = spy
    ds = ImageDataset(f"{folder}/train", R.TwoCropsTransform(R.moco_v2_augmentation(32)), seed=5)
    cfg = EngineConfig(1, 8, str(out), CheckpointPolicy(str(out)), "moco", "resnet18", workers=0, max_iters=3,
                       stop_check_every=1, print_freq=1, seed=5, fast_aug="on")
    return Trainer(m, torch.optim.SGD(m.trainable_parameters(), 0.03, momentum=0.9), lambda e, i, n: 0.03, ds, cfg,
                   DistInfo())


def test_fast_path_run_resumes_exactly(tiny_folder, tmp_path):
    """Through the fast path, a run stopped by SIGUSR1 after its 1st step and resumed sees the
    remaining batches and ends with the uninterrupted run's weights and queue (the augmentation is a
    function of (seed, epoch, index, view): the worker and device halves redraw the same views)."""
    ref = _fast_trainer(tiny_folder, tmp_path / "ref")
    ref.fit()
    run = tmp_path / "run"
    assert _fast_trainer(tiny_folder, run, fire_at=1).fit() == {"interrupted": 1.0, "next_iter": 1.0}
    resumed = _fast_trainer(tiny_folder, run)
    resumed.fit()
    assert resumed.resumed_from.endswith("checkpoint_interrupted.pth.tar")
    a, b = ref.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
