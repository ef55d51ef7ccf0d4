"""Device-side augmentations (src/data/gpu_aug.py, gpu_pipeline.py) against the torchvision / PIL
reference: each op per image against the library op with the same parameters (1e-5), the parameter
samplers against torchvision's and the reference probabilities over many images, the output
statistics of a whole preset against the PIL pipeline, determinism and batch independence."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy.stats import ks_2samp
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from src.data import gpu_aug as G
from src.data import transforms as R
from src.data.datasets import augmentation_seed
from src.data.device_transforms import uniform
from src.data.gpu_pipeline import device_pipeline, device_preset
from src.errors import UserError


def _picture(size: int = 24) -> np.ndarray:
    """A colourful test image: red→blue ramp, green ramp downwards, a green square (asymmetric) and
    a 2-px checkerboard texture (what blur and crop scale change)."""
    yy, xx = np.mgrid[0:size, 0:size]
    a = np.stack([200 * xx / (size - 1), 60 + 120 * yy / (size - 1), 200 * (1 - xx / (size - 1))], -1)
    a[size // 4:size // 2 + 2, size // 6:size // 2] = (30, 200, 40)
    a += 50 * (((xx // 2) + (yy // 2)) % 2)[..., None]
    return a.clip(0, 255).astype(np.uint8)


def _batch(n: int, size: int = 24) -> torch.Tensor:
    return torch.from_numpy(_picture(size)).permute(2, 0, 1)[None].expand(n, -1, -1, -1)


# ----------------------------------------------------------------------------- samplers
def test_uniform_draws_never_reach_one():
    """The counter-based draws lie on the 2^-24 grid (exact in float32), so u < 1 always: a crop
    offset floor(u·(H − h + 1)) can never leave the image (a 53-bit value rounded to float32 hit
    1.0 once in ~3·10^7 draws)."""
    u = uniform(torch.arange(5000), 8, stream=3)
    assert torch.equal(u * 2 ** 24, (u * 2 ** 24).floor()) and u.max() < 1.0 and u.min() >= 0.0
    assert abs(u.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("shape,scale", [((32, 32), (0.2, 1.0)), ((20, 40), (0.5, 1.0))])
def test_crop_boxes_follow_torchvision_get_params(shape, scale):
    """Area fraction, aspect ratio, offsets and the fallback rate (~30 % for the 20×40 image)
    match torchvision's RandomResizedCrop.get_params (two-sample KS over 3000 boxes each)."""
    H, W = shape
    n = 3000
    op = G.RandomResizedCrop(16, scale)
    p = op.params(torch.rand(n, op.draws, generator=torch.Generator().manual_seed(1)), (n, 3, H, W))
    torch.manual_seed(0)
    img = torch.zeros(3, H, W)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]).float()
    top, left, h, w = (p[k].float() for k in ("top", "left", "height", "width"))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    found = p["found"]
    area = (h * w / (H * W))[found]
    assert area.min() >= scale[0] - 0.02 and area.max() <= scale[1] + 0.05
    ratio = (w / h)[found]
    assert ratio.min() >= 3 / 4 - 0.1 and ratio.max() <= 4 / 3 + 0.1
    for mine, theirs in ((h * w, ref[:, 2] * ref[:, 3]), (w / h, ref[:, 3] / ref[:, 2]), (top, ref[:, 0]),
                         (left, ref[:, 1])):
        assert ks_2samp(mine.numpy(), theirs.numpy()).statistic < 0.05
    fallback_ref = ((ref[:, 2] == H) & (ref[:, 3] == min(W, round(H * 4 / 3)))).float().mean()
    assert abs((~found).float().mean() - fallback_ref) < 0.02
    if shape == (20, 40):
        assert fallback_ref > 0.25 and ((h == 20) & (w == 27))[~found].all()  # centre crop at the max ratio


def test_op_probabilities_and_ranges_over_many_images():
    """20000 images: every coin lands with its reference probability (±0.01), the jitter order is a
    uniform permutation, factors stay in torchvision's ranges, σ ~ U(0.1, 2)."""
    n = 20000
    pipe = device_preset("caco", 32)
    seeds = augmentation_seed(3, 5, torch.arange(n))
    x = torch.zeros(n, 3, 40, 40)
    expected = [{"jitter": 0.8, "gray": 0.2, "blur": 1.0, "flip": 0.5},
                {"jitter": 0.8, "gray": 0.2, "blur": 0.1, "solarize": 0.2, "flip": 0.5}]
    for view, want in zip(pipe.views, expected):
        params = dict(zip((d[0] for d in view.describe()), view.sample(seeds, x)))
        for name, prob in want.items():
            assert params[name]["applied"].float().mean().item() == pytest.approx(prob, abs=0.01), name
        jit = params["jitter"]
        first = torch.bincount(jit["order"][:, 0], minlength=4).float() / n
        assert torch.allclose(first, torch.full((4,), 0.25), atol=0.015)
        assert (jit["order"].sort(dim=1).values == torch.arange(4)).all()
        for f, (lo, hi) in zip(jit["factors"], [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            assert lo <= f.min() < lo + 0.01 and hi - 0.01 < f.max() <= hi and abs(f.mean() - (lo + hi) / 2) < 0.01
        s = params["blur"]["sigma"]
        assert 0.1 <= s.min() < 0.11 and 1.99 < s.max() <= 2.0
    crop = pipe.views[0].sample(seeds, x)[0]
    area = (crop["height"] * crop["width"]).float() / 1600
    assert crop["found"].all() and 0.19 < area.min() < 0.21 and area.max() == 1.0


# ----------------------------------------------------------------------------- ops vs the library
def test_crop_resize_equals_torchvision_and_pil():
    """The batched resampling equals v2.functional.resized_crop(antialias=True) per image (up- and
    downscaling, non-square), and PIL's crop + bilinear resize within its uint8 rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 30, 40, generator=g)
    top, left = torch.tensor([0, 5, 0, 3, 10]), torch.tensor([0, 7, 20, 1, 0])
    h, w = torch.tensor([30, 10, 30, 27, 20]), torch.tensor([40, 13, 20, 39, 40])
    for size in [(16, 16), (48, 48), (24, 33)]:
        out = G.resized_crop(x, top, left, h, w, size)
        ref = torch.stack([TF.resized_crop(x[b], int(top[b]), int(left[b]), int(h[b]), int(w[b]), list(size),
                                           antialias=True) for b in range(5)])
        assert (out - ref).abs().max() < 1e-5
    img = _picture(32)
    xi = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for t, l, hh, ww, s in [(5, 7, 10, 13, 32), (0, 0, 32, 32, 16), (3, 2, 20, 25, 24)]:
        o = G.resized_crop(xi, *(torch.tensor([v]) for v in (t, l, hh, ww)), (s, s))[0].permute(1, 2, 0).numpy()
        p = np.asarray(Image.fromarray(img).crop((l, t, l + ww, t + hh)).resize((s, s), Image.BILINEAR)) / 255
        assert np.abs(o - p).max() < 1.01 / 255  # PIL rounds to uint8 after each of its two passes


def test_colour_ops_equal_torchvision_in_the_sampled_order():
    """Per image: the device jitter equals torchvision's adjust_brightness/contrast/saturation/hue
    applied in the image's sampled order with its sampled factors (or nothing when the coin says
    so); grayscale, solarize, flip and torchvision-style blur equal their v2.functional ops."""
    n = 24
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 12, 12, generator=g)
    u = torch.rand(n, 9, generator=g)
    jit = G.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8)
    p = jit.params(u, x.shape)
    out = jit.apply(x, p)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    assert 0 < int(p["applied"].sum()) < n
    for b in range(n):
        ref = x[b]
        if p["applied"][b]:
            for k in p["order"][b].tolist():
                ref = fns[k](ref, float(p["factors"][k][b]))
        assert (out[b] - ref).abs().max() < 1e-5, b
    mask = torch.arange(n) % 3 == 0
    for op, ref_fn in ((G.Grayscale(), lambda im: TF.rgb_to_grayscale(im, 3)),
                       (G.Solarize(), lambda im: TF.solarize(im, 128 / 255)), (G.HorizontalFlip(), TF.horizontal_flip)):
        got = op.apply(x, {"applied": mask})
        assert torch.allclose(got[mask], ref_fn(x[mask]), atol=1e-6) and torch.equal(got[~mask], x[~mask])
    sig = torch.linspace(0.1, 2.0, n)
    got = G.gaussian_blur(x, sig, 9)
    ref = torch.stack([TF.gaussian_blur(x[b], [9, 9], [float(sig[b])] * 2) for b in range(n)])
    assert (got - ref).abs().max() < 1e-5


def test_pil_blur_reproduces_pil_gaussian_blur():
    """σ is PIL's radius (a standard deviation) and the result matches PIL's 3-pass extended-box blur,
    edges included, within PIL's uint8 rounding, on white noise (the worst case); a sampled Gaussian
    (torchvision's kernel) misses PIL by up to 30/255 at σ = 0.3 and at the edges."""
    img = (np.random.default_rng(0).random((30, 40, 3)) * 255).round().astype(np.uint8)
    xi = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for s in (0.1, 0.3, 0.7, 1.0, 2.0):
        ours = G.pil_gaussian_blur(xi, torch.tensor([s]), 2.0)[0].permute(1, 2, 0).numpy() * 255
        pil = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=s))).astype(float)
        assert np.abs(ours - pil).max() <= 3.0 and np.abs(ours - pil).mean() <= 1.2, s
    sampled = G.gaussian_blur(xi, torch.tensor([0.3]), 13)[0].permute(1, 2, 0).numpy() * 255
    pil = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=0.3))).astype(float)
    assert np.abs(sampled - pil).max() > 10


def test_whole_view_equals_the_ops_composed_per_image():
    """MoCo v2's device view on a batch equals, per image, torchvision's functional ops with that
    image's sampled parameters composed in the preset's order (crop → jitter → gray → blur → flip →
    normalise)."""
    view = device_preset("moco_v2", 16).views[0]
    n = 16
    x = _batch(n, 24).float() / 255
    seeds = augmentation_seed(0, 1, torch.arange(n))
    out = view(x, seeds)
    crop, jit, gray, blur, flip, _ = view.sample(seeds, x)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(n):
        im = TF.resized_crop(x[b], *(int(crop[k][b]) for k in ("top", "left", "height", "width")), [16, 16],
                             antialias=True)
        if jit["applied"][b]:
            for k in jit["order"][b].tolist():
                im = fns[k](im, float(jit["factors"][k][b]))
        im = TF.rgb_to_grayscale(im, 3) if gray["applied"][b] else im
        im = G.pil_gaussian_blur(im[None], blur["sigma"][b:b + 1], 2.0)[0] if blur["applied"][b] else im
        im = TF.horizontal_flip(im) if flip["applied"][b] else im
        im = TF.normalize(im, list(R.IMAGENET_MEAN), list(R.IMAGENET_STD))
        assert (out[b] - im).abs().max() < 1e-4, b


# ----------------------------------------------------------------------------- against the PIL pipeline
def view_statistics(o: torch.Tensor, std, grey_tol: float = 1e-3) -> tuple[float, list[torch.Tensor]]:
    """Of normalised views ``o`` (B×3×H×W), back in [0, 1]: the fraction that is grayscale, and per view
    the mean, std, red−blue balance, left−right balance (flip) and total variation (crop scale, blur)."""
    o = o * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(R.IMAGENET_MEAN).view(1, 3, 1, 1)
    grey = ((o[:, 0] - o[:, 1]).abs().amax((1, 2)) < grey_tol) & ((o[:, 1] - o[:, 2]).abs().amax((1, 2)) < grey_tol)
    half = o.shape[-1] // 2
    return grey.float().mean().item(), [o.mean((1, 2, 3)), o.std((1, 2, 3)), o[:, 0].mean((1, 2)) - o[:, 2].mean((1, 2)),
                                        o[..., :half].mean((1, 2, 3)) - o[..., half:].mean((1, 2, 3)),
                                        (o[..., 1:] - o[..., :-1]).abs().mean((1, 2, 3))]


def test_output_statistics_match_the_pil_reference_pipeline():
    """MoCo v2 aug-plus at 16 px on one picture: 600 outputs of the PIL reference (seeded as the
    dataset seeds it) against 3000 of the device twin. Grayscale fraction (detected in the outputs)
    within 0.05 of 0.2 for both; distributions of per-image mean, std, red−blue balance, left−right
    balance (flip) and total variation (crop scale, blur) agree (KS statistic < 0.1; the uint8
    truncation of PIL's blends shifts the mean by < 1/255, which 600 samples cannot see)."""
    img = Image.fromarray(_picture(24))
    ref_t = R.moco_v2_augmentation(16)
    outs = []
    for i in range(600):
        s = augmentation_seed(0, 0, i)
        random.seed(s)
        np.random.seed(s % 2 ** 32)
        torch.default_generator.manual_seed(s)
        outs.append(ref_t(img))
    ref = torch.stack(outs)
    dev = device_pipeline(ref_t)(_batch(3000), augmentation_seed(0, 1, torch.arange(3000)))[0]
    (g_ref, s_ref), (g_dev, s_dev) = view_statistics(ref, R.IMAGENET_STD), view_statistics(dev, R.IMAGENET_STD)
    assert abs(g_ref - 0.2) < 0.05 and abs(g_dev - 0.2) < 0.05
    for a, b in zip(s_ref, s_dev):
        assert ks_2samp(a.numpy(), b.numpy()).statistic < 0.1


# ----------------------------------------------------------------------------- seeding
def test_deterministic_per_image_and_independent_of_the_batch():
    """Same seeds → identical views; image i gets the same views in any batch (other images, other
    positions); another epoch or another view gives other augmentations."""
    pipe = device_preset("swav", 24, size_crops=[16, 8], nmb_crops=[2, 2], min_scale_crops=[0.14, 0.05],
                         max_scale_crops=[1.0, 0.14])
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(10, 3, 24, 24, generator=g) * 255).to(torch.uint8)
    idx_a, idx_b = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([7, 4, 9, 2])
    a = pipe(data[idx_a], augmentation_seed(1, 2, idx_a))
    a2 = pipe(data[idx_a], augmentation_seed(1, 2, idx_a))
    b = pipe(data[idx_b], augmentation_seed(1, 2, idx_b))
    other_epoch = pipe(data[idx_a], augmentation_seed(1, 3, idx_a))
    assert [v.shape for v in a] == [(6, 3, 16, 16)] * 2 + [(6, 3, 8, 8)] * 2
    for v in range(4):
        assert torch.equal(a[v], a2[v])
        assert torch.allclose(a[v][4], b[v][1], atol=1e-6) and torch.allclose(a[v][2], b[v][3], atol=1e-6)
        assert all(not torch.allclose(a[v][i], other_epoch[v][i]) for i in range(6))
    assert all(not torch.allclose(a[0][i], a[1][i]) for i in range(6))


def test_split_into_geometry_and_photometry_is_exact():
    """Crops + flips made first (e.g. by loader workers) and the rest applied to those crops through
    the batch_transform signature give the same views as the whole pipeline."""
    pipe = device_preset("moco_v2", 16)
    geo, photo = pipe.split()
    seeds = augmentation_seed(0, 4, torch.arange(12))
    x = _batch(12)
    whole = pipe(x, seeds)
    crops = geo(x, seeds)
    parts = photo(crops, seeds)
    as_uint8 = photo([(c * 255).round().to(torch.uint8) for c in crops], seeds)  # as workers would hand them over
    assert [d[0] for d in geo.describe()[0]] == ["crop", "flip"]
    assert [d[0] for d in photo.describe()[0]] == ["jitter", "gray", "blur", "normalize"]
    for w, p, q in zip(whole, parts, as_uint8):
        assert (w - p).abs().max() < 1e-5
        assert (w - q).abs().max() < 0.05  # ≤ 0.5/255 rounding, amplified by jitter, over the std 0.225


# ----------------------------------------------------------------------------- presets
def test_presets_mirror_the_reference_transforms():
    """The device twin of each method's reference has its ops, parameters and order."""
    jit = lambda p, b, c, s, h: ("jitter", p, ((1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)))
    norm = ("normalize", R.IMAGENET_MEAN, R.IMAGENET_STD)
    crop = ("crop", (32, 32), (0.2, 1.0), (0.75, 1.333333))
    assert device_preset("moco_v2", 32).describe() == [[crop, jit(0.8, 0.4, 0.4, 0.4, 0.1), ("gray", 0.2),
                                                        ("blur", 0.5, (0.1, 2.0), "pil"), ("flip", 0.5), norm]] * 2
    assert device_preset("pcl_v1", 32).describe()[0] == [crop, ("gray", 0.2), jit(1.0, 0.4, 0.4, 0.4, 0.4),
                                                         ("flip", 0.5), norm]
    sog = device_preset("sogclr", 32, crop_min=0.08).describe()[1]
    assert sog[0][2] == (0.08, 1.0) and sog[1] == jit(0.8, 0.4, 0.4, 0.2, 0.1) and sog[3] == ("blur", 1.0, (0.1, 2.0), "pil")
    v1, v2 = device_preset("caco", 32).describe()
    assert v1[3] == ("blur", 1.0, (0.1, 2.0), "pil") and [d[0] for d in v1] == ["crop", "jitter", "gray", "blur", "flip",
                                                                                "normalize"]
    assert v2[3] == ("blur", 0.1, (0.1, 2.0), "pil") and v2[4] == ("solarize", 0.2, round(128 / 255, 6))
    swav = device_preset("lorac", 224, color_distortion_scale=0.5).describe()
    assert [v[0][1] for v in swav] == [(224, 224)] * 2 + [(96, 96)] * 6
    assert swav[2][0][2] == (0.05, 0.14) and swav[0][2] == jit(0.8, 0.4, 0.4, 0.4, 0.1)
    assert [d[0] for d in swav[0]] == ["crop", "flip", "jitter", "gray", "blur", "normalize"]
    assert swav[0][-1] == ("normalize", R.IMAGENET_MEAN, R.SWAV_STD)
    caco_mc = device_preset("caco_multicrop", 224, size_crops=[96], nmb_crops=[4], min_scale_crops=[0.05],
                            max_scale_crops=[0.14]).describe()
    assert len(caco_mc) == 5 and caco_mc[0][0][1:3] == ((224, 224), (0.14, 1.0)) and caco_mc[1][0][1] == (96, 96)
    assert [d[0] for d in caco_mc[1]] == ["crop", "jitter", "gray", "blur", "flip", "normalize"]
    with pytest.raises(UserError, match="Resize has no device-side equivalent"):
        device_pipeline(R.eval_transform(32))
    with pytest.raises(UserError, match="unknown augmentation preset 'simclr'"):
        device_preset("simclr")
    assert math.isclose(device_pipeline(T.Compose([T.RandomResizedCrop(8), T.RandomSolarize(128, p=0.3)]))
                        .describe()[0][1][2], 128 / 255, rel_tol=1e-5)
