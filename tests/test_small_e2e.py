"""Every pretraining script runs two iterations at 32 px with ``--dataset cifar10`` (in-process, one
process) under the small-image preset, in the three data modes: DataLoader workers running the PIL
reference, ``--fast_aug on`` (workers crop and flip, the colour ops run batched on the device) and
``--data_on_device`` (the GPU-resident path), the last two here on CPU tensors. Checked: 32 px crops
(multi-crop 32/14), the CIFAR stem, the CIFAR normalisation, the preset's log line, the path taken."""
from __future__ import annotations

import glob
import importlib
import json
import math
import os

import pytest
import torch

from src.checkpoint import load_checkpoint
from tests.small_data import write_cifar10

pytestmark = pytest.mark.slow

TINY = ["--epochs", "1", "--max_iters", "2"]
MOCO = ["-a", "resnet18", "-b", "2", "--moco-k", "16", "--moco-dim", "16", "--mlp", "--aug-plus", "--cos", "-j", "0",
        "--print-freq", "1"]
# the seed's multi-crop groups, left at ImageNet sizes: the preset scales them to 32/14
MULTICROP = ["--nmb_crops", "2", "1", "--size_crops", "224", "96", "--min_scale_crops", "0.14", "0.05",
             "--max_scale_crops", "1.", "0.14", "--batch_size", "2", "--arch", "resnet18", "--workers", "0",
             "--print_freq", "1", "--warmup_epochs", "0", "--use_fp16", "false", "--sync_bn", "pytorch"]
MOCOM = ["--crops_for_assign", "0", "1", "--moco-dim", "16", "--moco-k", "16", "--mlp", "true", "--base_lr", "0.6"]
SWAV = ["--crops_for_assign", "0", "1", "--feat_dim", "16", "--nmb_prototypes", "10", "--hidden_mlp", "32",
        "--queue_length", "0", "--freeze_prototypes_niters", "1", "--base_lr", "0.6"]

SCRIPTS = {
    "main_moco": lambda d, t: [d, *MOCO],
    "main_pcl": lambda d, t: [d, *MOCO[:4], "--pcl-r", "4", "--low-dim", "16", *MOCO[8:], "--num-cluster", "10",
                              "--warmup-epoch", "0"],
    "main_disco": lambda d, t: [d, *MOCO[:6], "--moco-dim", "128", *MOCO[8:], "--teacher_arch", "resnet18",
                                "--teacher", t["moco"], "--hidden", "64"],
    "main_sogclr": lambda d, t: ["--data", d, "-a", "resnet18", "-b", "2", "--dim", "16", "--mlp-dim", "32",
                                 "--workers", "0", "--print-freq", "1", "--warmup-epochs", "0"],
    "main_caco": lambda d, t: ["--data", d, "-a", "resnet18", "--batch_size", "2", "--cluster", "8", "--moco_dim", "16",
                               "--mlp_dim", "32", "--ad_init", "0", "--knn_freq", "0", "--workers", "0",
                               "--multi_crop", "1", "--nmb_crops", "1", "1", "--print_freq", "1"],
    "main_moco_m": lambda d, t: ["--data_path", d, *MULTICROP, *MOCOM],
    "main_lorac": lambda d, t: ["--data_path", d, *MULTICROP, *MOCOM, "--epoch_lorac_starts", "0"],
    "main_swav": lambda d, t: ["--data_path", d, *MULTICROP, *SWAV],
    "main_swav_distill": lambda d, t: ["--data_path", d, *MULTICROP, *SWAV, "--pretrained", t["swav"]],
}
MULTI = {"main_moco_m", "main_lorac", "main_swav", "main_swav_distill", "main_caco"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("cifar"))
    write_cifar10(root)          # 20 train images (5 batches of 4), 8 test images
    return root


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict:
    """A DisCo teacher pretrained on CIFAR (ResNet-18 with the CIFAR stem, MoCo v2 head, 128-d) and a
    SwAV-format R-50 (DisCo + SwAV's official teacher arch, ImageNet stem)."""
    from src.models.backbones import build_encoder
    from src.models.heads import moco_head
    from src.models.teacher import build_teacher
    d = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    enc = build_encoder("resnet18", moco_head(512, 128, True, -1), cifar_stem=True)
    moco = str(d / "moco_cifar_r18.pth.tar")
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in enc.state_dict().items()}}, moco)
    t = build_teacher("SWAVresnet50", dim=16)
    swav = str(d / "swav_800ep_pretrain.pth.tar")
    torch.save({f"module.{k}": v for k, v in t.state_dict().items()}, swav)
    return {"moco": moco, "swav": swav}


def _ops(t) -> list:
    """Every transform inside ``t`` (Compose, RandomApply, two-crop and multi-crop wrappers)."""
    out = [t]
    for name in ("transforms", "trans", "t1", "t2"):
        sub = getattr(t, name, None)
        for s in (sub if isinstance(sub, (list, tuple)) else [sub] if sub is not None else []):
            out += _ops(s)
    return out


@pytest.mark.parametrize("mode", ["loader", "resident", "fast"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_two_iterations_at_32px_on_cifar10(script, mode, cifar, teachers, tmp_path, monkeypatch):
    from torchvision import transforms as T

    from src.data.cifar import CifarDataset
    from src.data.fast_path import WorkerCrops
    from src.data.resident import ResidentLoader
    from src.data.transforms import GaussianBlur, PILRandomGaussianBlur
    from src.engine import Trainer
    seen, loaders, fast = [], [], []
    init = Trainer.__init__

    def spy(self, *a, **kw):
        seen.append((a[3], a[3].transform))   # the reference transform, before any fast path takes it
        init(self, *a, **kw)
        loaders.append(type(self.loader))
        fast.append(isinstance(getattr(self.train_set, "transform", None), WorkerCrops) and
                    self.batch_transform is not None)
    monkeypatch.setattr(Trainer, "__init__", spy)
    out = str(tmp_path / "out")
    needs_teacher = script in ("main_disco", "main_swav_distill")
    argv = [*SCRIPTS[script](cifar, teachers if needs_teacher else {}), "--dataset", "cifar10", *TINY,
            "--output_dir", out, *{"resident": ["--data_on_device"], "fast": ["--fast_aug", "on"]}.get(mode, [])]
    importlib.import_module(script).main(argv)
    assert (loaders == [ResidentLoader]) == (mode == "resident"), loaders
    assert fast == [mode == "fast"]

    # the training pipeline the engine received: CIFAR train split, 32/14 px crops, CIFAR mean/std, no blur
    ((train_set, reference),) = seen
    ops = _ops(reference)
    assert isinstance(train_set, CifarDataset) and len(train_set) == 20
    assert {o.size[0] for o in ops if isinstance(o, T.RandomResizedCrop)} == ({32, 14} if script in MULTI else {32})
    norms = [o for o in ops if isinstance(o, T.Normalize)]
    assert norms and all(tuple(n.mean) == (0.4914, 0.4822, 0.4465) and tuple(n.std) == (0.2470, 0.2435, 0.2616)
                         for n in norms)
    assert not any(isinstance(o, (GaussianBlur, PILRandomGaussianBlur)) for o in ops)
    if script not in MULTI:
        assert {o.scale for o in ops if isinstance(o, T.RandomResizedCrop)} == {(0.08, 1.0)}

    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    assert args["image_size"] == 32 and args["cifar_stem"] is True and args["small_preset"]["dataset"] == "cifar10"
    assert args["small_preset"]["mean"] == [0.4914, 0.4822, 0.4465] and args["small_preset"]["blur"] is False
    if script in MULTI:
        assert args["size_crops"] == [32, 14]
    with open(os.path.join(out, "logs", "train.log")) as f:
        log = f.read()
    line = "small-image preset (cifar10, 32 px images): crops 32 px"
    assert line + (" (multi-crop 32/14 px)" if script in MULTI else ",") in log
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    steps = [r for r in rows if "iter" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps), steps
    ck = load_checkpoint(max(glob.glob(os.path.join(out, "*.pth.tar"))))
    stems = [v for k, v in ck["state_dict"].items()
             if k.endswith("conv1.weight") and "layer" not in k and "teacher" not in k]
    assert stems and all(tuple(v.shape) == (64, 3, 3, 3) for v in stems)   # the 3x3 CIFAR stem, every encoder
