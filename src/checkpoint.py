"""Checkpoints: atomic save, safe load, auto-resume lookup and ``load_backbone``.

Layouts ``load_backbone`` recognises (checked in this order, the one that covers every backbone
key wins):

=====================  =====================================================================
``module.encoder_q.``  ours, MoCo v1/v2, MoCo-M/LORAC, CaCo, PCL, DisCo (DDP-saved)
``encoder_q.``         the same saved without DDP
``module.base_encoder.``  SogCLR (and MoCo v3)
``base_encoder.``      the same without DDP
``module.``            SwAV / DeepCluster-v2 / SeLa-v2 raw state dicts, LORAC ``eval_linear``
``backbone.``          exported by other libraries (lightly, solo-learn)
(no prefix)            a plain torchvision / timm state dict (``scripts/export_backbone.py``)
=====================  =====================================================================

The state dict is looked up under ``state_dict``, ``model``, ``teacher`` or the top level. Every
``path`` may be a local file, an ``http(s)://`` URL or a zoo name (``src/zoo.py``).
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import tempfile
from typing import Any, Mapping

import torch
import torch.nn as nn

from .errors import UserError
from .models.backbones import build_backbone, head_attr

log = logging.getLogger("ssl")

PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.", "module.",
            "backbone.", "module.backbone.", "")


def _safe_globals() -> list:
    """Non-tensor types that official checkpoints hold (argparse args, numpy scalars)."""
    import numpy as np
    out: list = [argparse.Namespace]
    try:
        from numpy._core.multiarray import scalar  # numpy ≥ 2
    except ImportError:  # pragma: no cover
        from numpy.core.multiarray import scalar  # type: ignore
    out += [scalar, np.dtype]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np.dtypes, name):
            out.append(getattr(np.dtypes, name))
    return out


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: never executes pickled code. A few safe types the
    official checkpoints contain are allow-listed. ``path`` may also be an ``http(s)://`` URL or a
    zoo name (downloaded once into the cache, :func:`src.zoo.resolve`); a ``.part`` file is refused."""
    from .zoo import resolve
    path = resolve(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load checkpoint {path}: {_why_unloadable(path, e)}") from e


def _why_unloadable(path: str, e: Exception) -> str:
    """The reason ``torch.load`` failed, in words: a refused pickle, a truncated file, not a checkpoint."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        m = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({m.group(1)})" if m else ""
        return (f"it holds pickled Python objects{what} that would run code when loaded: refused. If you trust "
                "the file, load it yourself and re-save its state_dict")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        if "central directory" in text or "zip archive" in text:
            return "the file is truncated or corrupt (an incomplete checkpoint archive: was its write interrupted?)"
    elif not head or head[:1] != b"\x80":
        return "not a PyTorch checkpoint (neither a torch.save archive nor a pickle)"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def save_atomic(obj: Any, path: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename: a reader (or a resume
    after a kill) never sees a half-written file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (a copy when linking is not possible), atomically."""
    tmp = dst + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def latest_checkpoint(directory: str, pattern: str = r"checkpoint_(\d+)\.pth\.tar") -> str | None:
    """The checkpoint with the highest epoch number in ``directory`` (or None)."""
    if not os.path.isdir(directory):
        return None
    best, best_n = None, -1
    rx = re.compile(pattern)
    for f in os.listdir(directory):
        m = rx.fullmatch(f)
        if m and int(m.group(1)) > best_n:
            best, best_n = os.path.join(directory, f), int(m.group(1))
    return best


def extract_state_dict(ckpt: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(ckpt, Mapping):
        for k in ("state_dict", "model", "teacher", "network"):
            if k in ckpt and isinstance(ckpt[k], Mapping):
                return ckpt[k]
        return ckpt
    raise UserError("checkpoint holds no state dict")


def _candidate(sd: Mapping[str, torch.Tensor], prefix: str, head: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix) and torch.is_tensor(v):
            name = k[len(prefix):]
            if name.split(".")[0] == head:
                continue
            out[name] = v
    return out


def backbone_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module, head: str) -> tuple[dict, str]:
    """Pick the prefix whose keys cover ``model``'s state dict best; return (state dict, prefix)."""
    want = model.state_dict()
    best, best_prefix, best_score = {}, "", (-1, 0)
    for prefix in PREFIXES:
        cand = _candidate(sd, prefix, head)
        hits = sum(1 for k, v in cand.items() if k in want and tuple(v.shape) == tuple(want[k].shape))
        score = (hits, -len(cand))
        if score > best_score:
            best, best_prefix, best_score = cand, prefix, score
    return best, best_prefix


def load_into_backbone(model: nn.Module, ckpt_sd: Mapping[str, torch.Tensor], arch: str,
                       source: str = "checkpoint") -> str:
    """Load the backbone part of ``ckpt_sd`` into ``model`` (strict on every backbone key).
    Returns the detected prefix; raises :class:`UserError` naming missing / mis-shaped keys."""
    head = head_attr(arch)
    sd, prefix = backbone_state_dict(ckpt_sd, model, head)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    shape = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or shape:
        hint = ""
        if shape:
            k = shape[0]
            hint += f"; shape mismatch e.g. {k}: checkpoint {tuple(sd[k].shape)} vs {arch} {tuple(want[k].shape)}"
        if missing:
            hint += f"; missing e.g. {', '.join(missing[:3])}"
        raise UserError(f"{source} does not fit arch {arch!r}: {len(missing)} backbone keys missing and "
                        f"{len(shape)} mis-shaped (best key prefix {prefix!r}){hint}. "
                        f"Check -a/--arch and the checkpoint.")
    model.load_state_dict({k: sd[k] for k in want}, strict=True)
    return prefix


def load_into_encoder(model: nn.Module, ckpt_sd: Mapping[str, torch.Tensor], arch: str, *,
                      source: str = "checkpoint") -> tuple[str, list[str]]:
    """Load an encoder *with* its projection head (``model`` = ``build_encoder(arch, head)``): the
    same layout detection as :func:`load_into_backbone`, strict over every key of ``model``,
    backbone and head. Returns (detected prefix, checkpoint keys under that prefix left unused,
    e.g. SwAV's ``prototypes.*``). Raises :class:`UserError` naming missing / mis-shaped keys."""
    want = model.state_dict()
    best, best_prefix, best_score = {}, "", (-1, 0)
    for prefix in PREFIXES:
        cand = {k[len(prefix):]: v for k, v in ckpt_sd.items() if k.startswith(prefix) and torch.is_tensor(v)}
        hits = sum(1 for k, v in cand.items() if k in want and tuple(v.shape) == tuple(want[k].shape))
        if (hits, -len(cand)) > best_score:
            best, best_prefix, best_score = cand, prefix, (hits, -len(cand))
    missing = [k for k in want if k not in best]
    shape = [k for k in want if k in best and tuple(best[k].shape) != tuple(want[k].shape)]
    if missing or shape:
        head = head_attr(arch)
        hint = ""
        if shape:
            k = shape[0]
            hint += f"; shape mismatch e.g. {k}: checkpoint {tuple(best[k].shape)} vs model {tuple(want[k].shape)}"
        if missing:
            hint += f"; missing e.g. {', '.join(missing[:3])}"
        heads = sum(1 for k in missing if k.split(".")[0] == head)
        raise UserError(f"{source} does not fit {arch!r} with its projection head: {len(missing)} keys missing "
                        f"({heads} of them in the head '{head}') and {len(shape)} mis-shaped (best key prefix "
                        f"{best_prefix!r}){hint}")
    model.load_state_dict({k: best[k] for k in want}, strict=True)
    return best_prefix, sorted(k for k in best if k not in want)


def load_encoder(path: str, arch: str, head: nn.Module, *, cifar_stem: bool | None = None,
                 map_location="cpu") -> nn.Module:
    """``build_encoder(arch, head)`` with backbone and head loaded from the checkpoint at ``path``
    (any layout of the module docstring; every key must load). ``model.loaded_prefix`` and
    ``model.unused_keys`` tell what was found."""
    from .models.backbones import build_encoder
    sd = extract_state_dict(load_checkpoint(path, map_location))
    if cifar_stem is None:
        cifar_stem = has_cifar_stem(sd)
    model = build_encoder(arch, head, cifar_stem=cifar_stem)
    model.loaded_prefix, model.unused_keys = load_into_encoder(model, sd, arch, source=path)
    return model


def has_cifar_stem(sd: Mapping[str, torch.Tensor]) -> bool:
    """A ResNet checkpoint whose first conv is 3×3 was trained with the CIFAR stem."""
    for k, v in sd.items():
        if k.endswith("conv1.weight") and "layer" not in k and torch.is_tensor(v) and v.ndim == 4:
            return v.shape[-1] == 3
    return False


def load_backbone(path: str, arch: str, *, cifar_stem: bool | None = None, map_location="cpu") -> nn.Module:
    """Build ``arch`` without head and load the backbone of the checkpoint at ``path``,
    whatever its layout (module docstring). Every backbone key must load. ``cifar_stem=None``
    detects the stem from the checkpoint's first convolution."""
    sd = extract_state_dict(load_checkpoint(path, map_location))
    if cifar_stem is None:
        cifar_stem = has_cifar_stem(sd)
    model = build_backbone(arch, cifar_stem=cifar_stem)
    prefix = load_into_backbone(model, sd, arch, source=path)
    model.loaded_prefix = prefix
    return model


def backbone_or_random(pretrained: str, arch: str, *, seed: int, cifar_stem: bool = False, what: str = "features of"):
    """``load_backbone(pretrained, arch)``, or — without ``pretrained`` — a seeded randomly initialised
    backbone, said loudly (the evaluation scripts' baseline)."""
    if pretrained:
        net = load_backbone(pretrained, arch)
        log.info("loaded %s from %s (key prefix %r)", arch, pretrained, net.loaded_prefix)
        return net
    from .engine.rng import seed_everything
    seed_everything(seed)
    log.warning("no --pretrained given: %s a RANDOMLY INITIALISED %s backbone", what, arch)
    return build_backbone(arch, cifar_stem=cifar_stem)
