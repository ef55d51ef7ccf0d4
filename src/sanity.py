"""Start-up checks of every entry script: settings that are legal but almost certainly not meant.

Each check is a small pure function returning one line (or None); :func:`report` logs the lines on
rank 0 as warnings, each starting with ``unusual setting:``. Nothing is changed: the official defaults
stay, the user is told. The checks:

- :func:`amp_notice`: fp16/bf16 autocast is CUDA-only; says whether the flag was the script's default
  or given by the user (``args.explicit_flags``, see :func:`explicit_flags`).
- :func:`warmup_warning`: warm-up epochs >= half of the epochs.
- :func:`lr_warning`: the effective lr more than :data:`LR_FACTOR` times away from the method's
  documented recipe at the same batch (:data:`LR_RECIPES`).
- :func:`image_size_warning`: a crop size more than :data:`UPSAMPLE_FACTOR` times the shorter side of
  the images on disk (a few are sampled): training crops, the kNN monitor and ``eval_knn.py`` would
  silently upsample them.
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
from typing import Callable, Iterable, Sequence

log = logging.getLogger("ssl")

PREFIX = "unusual setting: "
LR_FACTOR = 4.0
UPSAMPLE_FACTOR = 2.0
SAMPLED_IMAGES = 8

#: method → (the recipe in words, recipe lr as a function of the batch the script scales with).
#: The batch is the one the script's own lr rule uses: SogCLR the global batch, CaCo ``--batch_size``;
#: the others do not scale the lr, so their recipe is a constant.
LR_RECIPES: dict[str, tuple[str, Callable[[int], float]]] = {
    "moco": ("MoCo v2 README: --lr 0.03 at batch 256, used as given", lambda b: 0.03),
    "disco": ("DisCo README: --lr 0.03 at batch 256, used as given", lambda b: 0.03),
    "mocom": ("LORAC README: --base_lr 1.8 (LARC, not scaled)", lambda b: 1.8),
    "lorac": ("LORAC README: --base_lr 1.8 (LARC, not scaled)", lambda b: 1.8),
    "sogclr": ("SogCLR README: 0.075 x sqrt(global batch)", lambda b: 0.075 * math.sqrt(b)),
    "caco": ("CaCo README: --lr 0.3 x batch_size/256", lambda b: 0.3 * b / 256),
    "pcl": ("PCL README: --lr 0.03 at batch 256, used as given", lambda b: 0.03),
}


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The ``dest`` of every option the command line sets (any spelling, ``--x=v``, abbreviations):
    ``argv`` parsed again with every default replaced by a marker. ``parser`` is consumed."""
    marker = object()
    for a in parser._actions:
        if a.dest != "help":
            a.default = marker
    parser._defaults.clear()
    ns, _ = parser.parse_known_args(list(argv))
    return sorted(k for k, v in vars(ns).items() if v is not marker)


def parse_args(make_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> argparse.Namespace:
    """``make_parser().parse_args(argv)`` plus ``args.explicit_flags`` (the flags the user gave)."""
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    args.explicit_flags = explicit_flags(make_parser(), argv)
    return args


def amp_notice(args: argparse.Namespace, device) -> str | None:
    """One line when fp16/bf16 autocast was asked for (by the user or by the script's default) but the
    device is not CUDA: the run trains in fp32."""
    if getattr(device, "type", str(device)) == "cuda":
        return None
    given = set(getattr(args, "explicit_flags", []))
    if getattr(args, "bf16", False):
        return "--bf16 requested, but bf16 autocast is CUDA-only: this run trains in fp32"
    if not getattr(args, "use_fp16", False):
        return None
    if "use_fp16" in given:
        return "--use_fp16 requested, but fp16 autocast is CUDA-only: this run trains in fp32"
    return "fp16 autocast (on by default in this script, as in the official one) is off on the CPU: this run trains in fp32"


def warmup_warning(warmup_epochs: float, epochs: int, flag: str = "--warmup_epochs") -> str | None:
    if epochs > 0 and warmup_epochs > 0 and warmup_epochs >= epochs / 2:
        return (f"{PREFIX}{flag} {warmup_epochs:g} is at least half of --epochs {epochs}: "
                "most of the run is spent warming up the lr")
    return None


def lr_warning(method: str, lr: float, batch: int, how: str = "") -> str | None:
    """``lr`` (effective, after the script's scaling; ``how`` says how it was computed) vs the recipe."""
    if method not in LR_RECIPES or lr <= 0:
        return None
    words, fn = LR_RECIPES[method]
    ref = fn(batch)
    if ref <= 0 or (1 / LR_FACTOR) <= lr / ref <= LR_FACTOR:
        return None
    return (f"{PREFIX}effective lr {lr:.4g}{' (' + how + ')' if how else ''} is {lr / ref:.3g}x the documented "
            f"recipe {ref:.4g} at this batch ({words})")


def sample_image_sides(dataset, n: int = SAMPLED_IMAGES) -> list[int]:
    """Shorter side of up to ``n`` images spread over ``dataset.samples`` (headers only); unreadable
    files and datasets without files (CIFAR arrays) give nothing."""
    samples = getattr(dataset, "samples", None)
    if not samples:
        return []
    from PIL import Image
    step = max(len(samples) // n, 1)
    sides = []
    for path, _ in list(samples)[::step][:n]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:
            continue
    return sides


def image_size_warning(dataset, size: int, flag: str, what: str) -> str | None:
    """``size`` (a crop size in px) vs the median shorter side of a few images of ``dataset``."""
    sides = sample_image_sides(dataset) if dataset is not None and size else []
    if not sides:
        return None
    side = statistics.median(sides)
    if size <= UPSAMPLE_FACTOR * side:
        return None
    return (f"{PREFIX}{flag} {size} is {size / side:.3g}x the images on disk ({what}: shorter side about "
            f"{side:g} px in {len(sides)} sampled): they are silently upsampled; pass e.g. {flag} {int(side)}")


def knn_image_size_warning(knn, size: int, flag: str = "--image_size") -> str | None:
    """The kNN monitor's bank images vs its eval crop (Resize(size·256/224) + CenterCrop(size))."""
    if knn is None:
        return None
    return image_size_warning(getattr(knn, "bank", None), size, flag, "kNN monitor bank")


def report(info, *lines: str | Iterable[str] | None) -> list[str]:
    """Log each line (a warning, or the amp notice as info) once, on rank 0; returns them."""
    out = []
    for x in lines:
        for line in ([x] if isinstance(x, str) or x is None else x):
            if line:
                out.append(line)
    if getattr(info, "is_main", True):
        for line in out:
            (log.warning if line.startswith(PREFIX) else log.info)("%s", line)
    return out
