"""Batched, per-image random augmentations on device tensors (CUDA or CPU), torchvision semantics.

Each op is an object with ``draws`` (how many uniforms in [0, 1) it consumes per image),
``params(u, shape)`` (the per-image parameters from a ``B × draws`` block of
:func:`~src.data.device_transforms.uniform` numbers, which are a pure function of the image's
``augmentation_seed``) and ``apply(x, params)`` on a float batch ``B × 3 × H × W`` in [0, 1]. A
:class:`~src.data.gpu_pipeline.ViewPipeline` chains them; every image gets its own parameters, so
its augmentation does not depend on the batch it lands in.

Sampling follows the torchvision / PIL reference op by op (``src/data/transforms.py``):

- :class:`RandomResizedCrop`: ``get_params`` of torchvision — area fraction ~ U(scale), log aspect
  ~ U(log ratio), ``w = round(√(A·r))``, ``h = round(√(A/r))``, the first of 10 attempts that fits,
  else the centre crop clamped to the ratio range; offsets ~ randint. The crop is resized with
  separable resampling matrices that reproduce torchvision's antialiased bilinear resize of the
  cropped image (PIL's bilinear filter: triangle of support ``max(scale, 1)``, taps clamped to the
  crop), one ``B × S × H`` and one ``B × S × W`` matrix, i.e. two batched matmuls. Hand-written:
  no library op resizes a batch of differently sized boxes with antialiasing (``roi_align`` averages
  a box of bilinear samples and reads across the crop border; ``grid_sample`` does not antialias).
- :class:`ColorJitter`: factors ~ U(max(0, 1 − s), 1 + s) (hue ~ U(−h, h)), the four ops in a
  random order per image (a uniform random permutation, as ``randperm(4)``), with torchvision's
  tensor formulas (blend with black / the grey mean / the grey image, clamp; hue in HSV).
  Hand-written blends: torchvision's ``adjust_*`` take one Python float per call.
- :class:`Grayscale`, :class:`Solarize`, :class:`HorizontalFlip`, :class:`Normalize`: torchvision's
  ``v2.functional`` ops on the images selected by a per-image coin.
- :class:`GaussianBlur`: PIL's ``GaussianBlur(radius=σ)``, σ ~ U(lo, hi) per image, reproduced as
  PIL computes it (σ is the standard deviation; three passes of an "extended box" per axis, edges
  replicated at each pass; the kernel spans ±3(⌊r⌋+1) px, 13 taps for σ ≤ 2, in pixels of the crop
  whatever its size). torchvision's ``T.GaussianBlur`` (sampled Gaussian of a fixed kernel size,
  reflected edges) is supported too. Hand-written: torchvision's ``gaussian_blur`` takes one σ per
  call, and PIL's box approximation (which blurs visibly more than a sampled Gaussian for σ < 0.5,
  and treats edges per pass) has no tensor equivalent.

Values differ from the PIL path only by its uint8 rounding after every op (≤ 0.5/255 each), PIL's
fixed-point arithmetic (see docs/architecture.md).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def _coin(u: torch.Tensor, p: float, inclusive: bool = False) -> torch.Tensor:
    """Applied iff ``u < p`` (torchvision's ``rand < p``) or ``u <= p`` (``RandomApply`` / SwAV)."""
    return u <= p if inclusive else u < p


def _apply_where(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """``fn(x[idx], idx)`` written back into the images selected by ``mask`` (others untouched)."""
    idx = mask.nonzero().flatten()
    if idx.numel() == 0:
        return x
    return x.index_copy(0, idx, fn(x.index_select(0, idx), idx).to(x.dtype))


# ----------------------------------------------------------------------------- crop
def resample_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """``B × out × in`` weights resizing the window ``[start, start + length)`` of an axis of
    ``in_size`` px to ``out_size`` px: torchvision's antialiased bilinear (= PIL's bilinear filter)
    applied to the cropped axis — centre ``(o + ½)·scale``, triangle of half-width ``max(scale, 1)``
    (in crop pixels), taps outside the crop dropped, rows normalised."""
    start, length = start.double(), length.double()
    scale = length / out_size
    support = scale.clamp(min=1.0).view(-1, 1, 1)
    centre = (torch.arange(out_size, device=start.device, dtype=torch.float64) + 0.5).view(1, -1, 1) \
        * scale.view(-1, 1, 1)
    pos = torch.arange(in_size, device=start.device, dtype=torch.float64).view(1, 1, -1) - start.view(-1, 1, 1)
    w = (1.0 - ((pos - centre + 0.5) / support).abs()).clamp(min=0.0)
    w = w * ((pos >= 0) & (pos < length.view(-1, 1, 1)))
    return (w / w.sum(-1, keepdim=True)).float()


def resized_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                 width: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Image b's box (top, left, height, width) resized to ``size`` = (h, w); equals
    ``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)`` per image."""
    wy = resample_matrix(top, height, x.shape[-2], size[0])     # B × h × H
    wx = resample_matrix(left, width, x.shape[-1], size[1])     # B × w × W
    tmp = torch.matmul(x, wx.transpose(1, 2).unsqueeze(1))      # B × C × H × w
    return torch.matmul(wy.unsqueeze(1), tmp)                   # B × C × h × w


class RandomResizedCrop:
    """``T.RandomResizedCrop(size, scale, ratio)`` (bilinear, antialiased), vectorised over the batch."""
    attempts = 10

    def __init__(self, size: int | Sequence[int], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.draws = 2 * self.attempts + 2

    def describe(self) -> tuple:
        return ("crop", self.size, self.scale, tuple(round(r, 6) for r in self.ratio))

    def params(self, u: torch.Tensor, shape) -> dict:
        H, W = shape[-2], shape[-1]
        u = u.double()
        n = self.attempts
        area = H * W * (self.scale[0] + u[:, :n] * (self.scale[1] - self.scale[0]))
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + u[:, n:2 * n] * (hi - lo))
        w = torch.round(torch.sqrt(area * aspect))          # half to even, like Python's round()
        h = torch.round(torch.sqrt(area / aspect))
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = ok.int().argmax(dim=1, keepdim=True)        # the first attempt that fits
        w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(dim=1)
        in_ratio = W / H                                    # fallback: torchvision's centre crop
        if in_ratio < min(self.ratio):
            fw, fh = W, round(W / min(self.ratio))
        elif in_ratio > max(self.ratio):
            fw, fh = round(H * max(self.ratio)), H
        else:
            fw, fh = W, H
        w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
        top = torch.floor(u[:, 2 * n] * (H - h + 1))
        left = torch.floor(u[:, 2 * n + 1] * (W - w + 1))
        top = torch.where(found, top, float((H - fh) // 2))
        left = torch.where(found, left, float((W - fw) // 2))
        return {"top": top.long(), "left": left.long(), "height": h.long(), "width": w.long(), "found": found}

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return resized_crop(x, p["top"], p["left"], p["height"], p["width"], self.size)


class HorizontalFlip:
    """``T.RandomHorizontalFlip(p)``."""
    draws = 1

    def __init__(self, p: float = 0.5):
        self.p = p

    def describe(self) -> tuple:
        return ("flip", self.p)

    def params(self, u: torch.Tensor, shape) -> dict:
        return {"applied": _coin(u[:, 0], self.p)}

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return _apply_where(x, p["applied"], lambda xs, idx: TF.horizontal_flip(xs))


# ----------------------------------------------------------------------------- colour
def _grey(x: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(x, num_output_channels=1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with one ratio per image: ``clamp(f·a + (1 − f)·b, 0, 1)``."""
    f = f.view(-1, 1, 1, 1).to(a.dtype)
    return (f * a + (1.0 - f) * b).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` (RGB → HSV, ``h ← (h + shift) mod 1``, → RGB), one shift per image."""
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    grey = delta == 0
    s = delta / torch.where(grey, torch.ones_like(maxc), maxc)
    d = torch.where(grey, torch.ones_like(delta), delta)
    r, g, b = x.unbind(dim=1)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = ((h / 6.0 + shift.view(-1, 1, 1).to(x.dtype)) % 1.0) * 6.0
    i = torch.floor(h)
    f = h - i
    i = i.long() % 6
    p = (maxc * (1.0 - s)).clamp(0.0, 1.0)
    q = (maxc * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (maxc * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    vpqt = torch.stack((maxc, p, q, t), dim=1)                 # B × 4 × H × W
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    return vpqt.gather(1, select[:, i].permute(1, 0, 2, 3))


def _jitter_range(v, centre: float, bound: tuple) -> tuple | None:
    """torchvision's ``ColorJitter._check_input``: a strength s gives [max(lo, c − s), c + s]; a pair is
    taken as is; the identity range (c, c) means the op is skipped."""
    if v is None:
        return None
    lo, hi = (max(bound[0], centre - v), centre + v) if isinstance(v, (int, float)) else (float(v[0]), float(v[1]))
    return None if lo == hi == centre else (float(lo), float(hi))


class ColorJitter:
    """``RandomApply([T.ColorJitter(b, c, s, h)], p)`` (``p = 1``: the bare ``ColorJitter``): per image
    a coin, a random order of the four ops and their factors ~ U(range). Each of b, c, s, h is a
    strength or a (min, max) pair, as torchvision; zero skips that op."""
    draws = 1 + 4 + 4

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p: float = 1.0):
        self.ranges = [_jitter_range(v, 1.0, (0.0, math.inf)) for v in (brightness, contrast, saturation)]
        self.ranges.append(_jitter_range(hue, 0.0, (-0.5, 0.5)))
        self.p = p

    def describe(self) -> tuple:
        return ("jitter", self.p, tuple(None if r is None else tuple(round(v, 6) for v in r) for r in self.ranges))

    def params(self, u: torch.Tensor, shape) -> dict:
        factors = [None if r is None else r[0] + u[:, 5 + k] * (r[1] - r[0]) for k, r in enumerate(self.ranges)]
        return {"applied": _coin(u[:, 0], self.p, inclusive=True), "order": u[:, 1:5].argsort(dim=1),
                "factors": factors}

    @staticmethod
    def _op(k: int, xs: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        if k == 0:
            return _blend(xs, torch.zeros_like(xs), f)
        if k == 1:
            return _blend(xs, _grey(xs).mean(dim=(-3, -2, -1), keepdim=True), f)
        if k == 2:
            return _blend(xs, _grey(xs), f)
        return adjust_hue(xs, f)

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        for step in range(4):
            for k, f in enumerate(p["factors"]):
                if f is not None:
                    sel = p["applied"] & (p["order"][:, step] == k)
                    x = _apply_where(x, sel, lambda xs, idx, k=k, f=f: self._op(k, xs, f[idx]))
        return x


class Grayscale:
    """``T.RandomGrayscale(p)``: ITU-R 601-2 luma copied to the three channels."""
    draws = 1

    def __init__(self, p: float = 0.1):
        self.p = p

    def describe(self) -> tuple:
        return ("gray", self.p)

    def params(self, u: torch.Tensor, shape) -> dict:
        return {"applied": _coin(u[:, 0], self.p)}

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return _apply_where(x, p["applied"], lambda xs, idx: TF.rgb_to_grayscale(xs, num_output_channels=3))


class Solarize:
    """PIL ``ImageOps.solarize`` (values ≥ threshold inverted; 128 of 255) with probability ``p``
    (``RandomApply([Solarize()], p)`` or ``T.RandomSolarize``)."""
    draws = 1

    def __init__(self, p: float = 1.0, threshold: float = 128 / 255, inclusive: bool = True):
        self.p, self.threshold, self.inclusive = p, threshold, inclusive

    def describe(self) -> tuple:
        return ("solarize", self.p, round(self.threshold, 6))

    def params(self, u: torch.Tensor, shape) -> dict:
        return {"applied": _coin(u[:, 0], self.p, self.inclusive)}

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return _apply_where(x, p["applied"], lambda xs, idx: TF.solarize(xs, self.threshold))


def pil_box_radius(sigma: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """PIL's ``_gaussian_blur_radius``: the fractional radius ``l + a`` of the box whose ``passes``-fold
    repetition has variance σ² (Gwosdek et al. 2011, the "extended box")."""
    s2 = sigma.double() ** 2 / passes
    big_l = torch.sqrt(12.0 * s2 + 1.0)
    small_l = torch.floor((big_l - 1.0) / 2.0)
    a = (2 * small_l + 1) * (small_l * (small_l + 1) - 3 * s2) / (6 * (s2 - (small_l + 1) ** 2))
    return small_l + a


def _line_filter(x: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-image 1-D filter ``w`` (B × (2R+1)) along ``dim`` (-1 or -2), edges replicated."""
    radius, n = (w.shape[1] - 1) // 2, x.shape[dim]
    pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
    xp = F.pad(x, pad, mode="replicate")
    return sum(w[:, t].view(-1, 1, 1, 1) * xp.narrow(dim, t, n) for t in range(2 * radius + 1))


def pil_gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """PIL's ``ImageFilter.GaussianBlur(radius=σ)`` with one σ per image: three passes of an extended
    box of radius ``r = l + a`` (weights 1/(2r+1) on |k| ≤ l, a/(2r+1) on |k| = l+1) along the rows,
    then three along the columns, edges replicated at every pass. The kernel spans ±3(⌊r⌋+1) px
    (±6 for σ ≤ 2); PIL rounds to uint8 after each pass, this stays in float."""
    r = pil_box_radius(sigma)
    radius = math.floor(float(pil_box_radius(torch.tensor(float(max_sigma))))) + 1
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64).abs().view(1, -1)
    low = torch.floor(r).view(-1, 1)
    w = torch.where(k <= low, 1.0, torch.where(k == low + 1, r.view(-1, 1) - low, 0.0)) / (2 * r.view(-1, 1) + 1)
    w = w.to(x.dtype)
    for dim in (-1, -2):
        for _ in range(3):
            x = _line_filter(x, w, dim)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (sampled Gaussian of ``kernel_size`` taps, reflected edges)
    with one σ per image."""
    radius = kernel_size // 2
    k = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float64)
    w = torch.exp(-0.5 * (k.view(1, -1) / sigma.double().view(-1, 1)) ** 2)
    w = (w / w.sum(dim=1, keepdim=True)).to(x.dtype)
    xp = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    H, W = x.shape[-2:]
    rows = sum(w[:, t].view(-1, 1, 1, 1) * xp[..., t:t + W] for t in range(2 * radius + 1))
    return sum(w[:, t].view(-1, 1, 1, 1) * rows[..., t:t + H, :] for t in range(2 * radius + 1))


class GaussianBlur:
    """PIL blur of radius σ ~ U(sigma) with probability ``p`` — the repo's ``GaussianBlur`` (under
    ``RandomApply``) and SwAV's ``PILRandomGaussianBlur`` — or, with ``kernel_size``, torchvision's
    ``T.GaussianBlur`` (fixed kernel, reflected edges)."""
    draws = 2

    def __init__(self, p: float = 1.0, sigma=(0.1, 2.0), kernel_size: int | None = None, inclusive: bool = True):
        self.p, self.sigma, self.inclusive, self.kernel_size = p, tuple(sigma), inclusive, kernel_size

    def describe(self) -> tuple:
        return ("blur", self.p, self.sigma, "pil" if self.kernel_size is None else self.kernel_size)

    def params(self, u: torch.Tensor, shape) -> dict:
        return {"applied": _coin(u[:, 0], self.p, self.inclusive),
                "sigma": self.sigma[0] + u[:, 1] * (self.sigma[1] - self.sigma[0])}

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        if self.kernel_size is None:
            fn = lambda xs, idx: pil_gaussian_blur(xs, p["sigma"][idx], self.sigma[1])
        else:
            fn = lambda xs, idx: gaussian_blur(xs, p["sigma"][idx], self.kernel_size)
        return _apply_where(x, p["applied"], fn)


class Normalize:
    """``T.Normalize(mean, std)`` of the [0, 1] batch."""
    draws = 0

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def describe(self) -> tuple:
        return ("normalize", tuple(self.mean), tuple(self.std))

    def params(self, u: torch.Tensor, shape) -> dict:
        return {}

    def apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return TF.normalize(x, self.mean, self.std)
