"""SwAV/LORAC multi-crop pipeline (moco_m_lorac.md §4)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from src.data.datasets import ImageDataset, collate_crops
from src.data.transforms import MultiCropTransform, PILRandomGaussianBlur


def pipeline_ops(t: T.Compose) -> list:
    return list(t.transforms)


def test_multicrop_order_and_parameters():
    mc = MultiCropTransform([224, 96], [3, 5], [0.14, 0.05], [1.0, 0.14], color_distortion_scale=0.5)
    assert len(mc.trans) == 8
    for i, t in enumerate(mc.trans):
        ops = pipeline_ops(t)
        names = [type(o).__name__ for o in ops]
        assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale",
                         "PILRandomGaussianBlur", "ToTensor", "Normalize"]
        rrc, flip, jit, gray, blur, _, norm = ops
        assert rrc.size == ((224, 224) if i < 3 else (96, 96))
        assert rrc.scale == ((0.14, 1.0) if i < 3 else (0.05, 0.14))
        assert rrc.ratio == pytest.approx((3 / 4, 4 / 3))
        assert rrc.interpolation == T.InterpolationMode.BILINEAR
        assert flip.p == 0.5 and jit.p == 0.8 and gray.p == 0.2
        cj = jit.transforms[0]
        assert cj.brightness == pytest.approx((0.6, 1.4)) and cj.contrast == pytest.approx((0.6, 1.4))
        assert cj.saturation == pytest.approx((0.6, 1.4)) and cj.hue == pytest.approx((-0.1, 0.1))
        assert blur.p == 0.5 and (blur.radius_min, blur.radius_max) == (0.1, 2.0)   # blur on every crop
        assert tuple(norm.std) == (0.228, 0.224, 0.225) and tuple(norm.mean) == (0.485, 0.456, 0.406)


def test_blur_coin_flip_uses_numpy_rand_le_p():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (16, 16, 3), dtype=np.uint8))
    blur = PILRandomGaussianBlur(p=0.5)
    for seed in range(6):
        np.random.seed(seed)
        do_it = np.random.rand() <= 0.5
        np.random.seed(seed)
        out = blur(img)
        assert (np.asarray(out) != np.asarray(img)).any() == do_it


def test_multicrop_dataset_collates_groups(tiny_folder):
    mc = MultiCropTransform([32, 16], [3, 2], [0.14, 0.05], [1.0, 0.14])
    ds = ImageDataset(f"{tiny_folder}/train", mc, seed=0)
    batch = collate_crops([ds[(i, 0)] for i in range(4)])
    crops = batch[0]
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 3 + [(4, 3, 16, 16)] * 2
    # independent randomness per crop, reproducible per (epoch, index)
    assert not torch.equal(crops[0], crops[1])
    again = collate_crops([ds[(i, 0)] for i in range(4)])[0]
    assert all(torch.equal(a, b) for a, b in zip(crops, again))


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        MultiCropTransform([224, 96], [3], [0.14, 0.05], [1.0, 0.14])
