"""The learning check: a short MoCo v2 run must teach its encoder something a random one does not know.

Data: :func:`src.data.procedural.write_invariant_cifar10` — four texture classes (horizontal and
vertical stripes, checkerboard, dots) that differ only in their geometry, which MoCo v2's
augmentations keep, while every per-image nuisance (period, phase, brightness, contrast,
saturation, hue) is one those augmentations draw afresh for each view. 512 training images, 256
test images, in CIFAR-10's python format, read with ``--dataset cifar10`` at 16 px.

Run: ``main_moco.py`` (MoCo v2: ``--mlp --aug-plus``, the small-image preset, the GPU-resident data
path on CPU tensors) with the CPU-sized ``conv4`` backbone for 19 epochs of 8 steps (~15 s), then
``eval_knn.py`` (k = 20, T = 0.2) on its last checkpoint and on three randomly initialised Conv-4
encoders. Measured with this seed: random 87.5 / 89.1 / 83.6 %, trained 98.8 % (docs/small_images.md,
"The learning check", has the other seeds: trained 98.0–99.6 %, best random 88.7–89.1 %).

Asserted: the trained encoder beats the best random one by at least 5 points and has at most half
its kNN error. Each of these breaks it (tried): the positive key taken from another image of the
batch, the key encoder left at its initialisation, the loss's sign flipped.
"""
from __future__ import annotations

import glob
import json
import os

import pytest

import eval_knn
import main_moco
from src.data.procedural import write_invariant_cifar10

pytestmark = pytest.mark.slow

EPOCHS = 19
MOCO_V2 = ["--dataset", "cifar10", "--image_size", "16", "-a", "conv4", "-b", "64", "--lr", "0.03",
           "--moco-k", "64", "--moco-m", "0.99", "--moco-t", "0.2", "--mlp", "--aug-plus", "--epochs", str(EPOCHS),
           "--data_on_device", "--seed", "0", "-j", "0", "--print-freq", "100"]


def knn_top1(root: str, out: str, pretrained: str = "", seed: int = 0) -> float:
    eval_knn.main([root, "--dataset", "cifar10", "--image_size", "16", "-a", "conv4", "--pretrained", pretrained,
                   "--seed", str(seed), "--nb_knn", "20", "--temperature", "0.2", "-j", "0", "--dump_path", out])
    with open(os.path.join(out, "knn_results.json")) as f:
        return json.load(f)["knn"]["20"]["top1"]


def test_short_moco_v2_run_beats_random_encoders(tmp_path):
    root = write_invariant_cifar10(str(tmp_path / "data"), train_per_class=128, test_per_class=64, seed=0)
    out = str(tmp_path / "moco")
    main_moco.main([root, *MOCO_V2, "--output_dir", out])
    last = sorted(glob.glob(os.path.join(out, "checkpoint_*.pth.tar")))[-1]
    assert last.endswith(f"checkpoint_{EPOCHS - 1:04d}.pth.tar")
    trained = knn_top1(root, str(tmp_path / "knn_trained"), last)
    random = [knn_top1(root, str(tmp_path / f"knn_random{s}"), seed=s) for s in range(3)]
    best = max(random)
    msg = f"kNN top-1: trained {trained:.1f} %, random inits {', '.join(f'{r:.1f}' for r in random)} %"
    assert 60.0 < best < 95.0, f"the data no longer leaves room to learn: {msg}"
    assert trained >= best + 5.0, msg
    assert 100.0 - trained <= (100.0 - best) / 2, msg


def test_conv4_is_the_few_shot_convnet_with_a_global_pool():
    """Four conv3×3(64)-BN-ReLU-maxpool2 blocks (Vinyals et al. 2016), a global average pool, the head
    slot ``fc``; the pool's ceil mode keeps a 64-d feature down to multi-crop's 14 px local crops."""
    import torch
    import torch.nn as nn

    from src.errors import UserError
    from src.models.backbones import build_backbone, build_encoder, feat_dim
    from src.models.heads import moco_head
    net = build_backbone("conv4")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == \
        [(3, 64, (3, 3), (1, 1))] + [(64, 64, (3, 3), (1, 1))] * 3
    assert [type(m).__name__ for m in net.features][:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert sum(p.numel() for p in net.parameters()) == 4 * 128 + 3 * 64 * 9 + 3 * 64 * 64 * 9 == 112832
    net.eval()
    for side in (14, 16, 32, 84):
        assert net(torch.rand(2, 3, side, side)).shape == (2, feat_dim("conv4")) == (2, 64)
    enc = build_encoder("conv4", moco_head(64, 16, True))
    assert {k.split(".")[0] for k in enc.state_dict()} == {"features", "fc"}
    with pytest.raises(UserError, match="only available for ResNet"):
        build_backbone("conv4", cifar_stem=True)
