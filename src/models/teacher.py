"""DisCo's frozen teacher: build it for ``--teacher_arch`` and load it strictly from its checkpoint
(disco_pcl_evals.md A2, D1.6-7).

Accepted files (the state dict is looked up under ``state_dict`` or at the top level):

=================================  =========================================  ==================================
``--teacher_arch``                 file                                       keys used / deliberately dropped
=================================  =========================================  ==================================
resnet50, resnet101, resnet152     ``main_moco.py`` checkpoints, official      ``module.encoder_q.*`` (backbone +
                                   MoCo v1/v2 and DisCo ``moco/``              ``fc``) / ``module.encoder_k.*``,
                                   checkpoints (``checkpoint_0199.pth.tar``)   ``module.queue``, ``module.queue_ptr``
resnet50w2, SWAVresnet50,          SwAV / DeepCluster-v2 / SeLa-v2 raw         ``module.*`` (backbone +
DCresnet50, SELAresnet50           state dicts (``swav_800ep_pretrain.pth``,   ``projection_head``) /
                                   ``deepclusterv2_800ep_pretrain.pth.tar``,   ``module.prototypes*``
                                   ``selav2_400ep_pretrain.pth.tar``, ...)
=================================  =========================================  ==================================

The same layouts saved without DDP (no ``module.``) are accepted too. Every other key is an error, as
is a missing or mis-shaped one: the official code loads with ``strict=False`` and silently keeps a
random teacher on a wrong file. The teacher's queue is never copied into the student (the official
code overwrites the student's queue with it; D1.6). ``path`` may also be a URL or a zoo name
(``src/zoo.py``: ``moco_v2_r50_e800``, ``swav_r50_e800``, ``swav_r50w2_e400``), read from the cache.

Teacher heads (A2): a ResNet teacher's ``fc`` is read from the checkpoint (MoCo v2 MLP
``fc.0``/``fc.2`` = Linear(2048, h) → ReLU → Linear(h, 128), or a linear ``fc``); SwAV-format teachers
get SwAV's BN head (hidden 8192 for R50×2, 2048 otherwise) with L2-normalised output.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn as nn

from ..checkpoint import extract_state_dict, has_cifar_stem, load_checkpoint, load_into_encoder
from ..errors import UserError
from ..zoo import resolve
from .backbones import build_encoder, feat_dim
from .swav_resnet import SWAV_TEACHERS, swav_projection_head

log = logging.getLogger("ssl")

#: the official ResNet teachers are R-50/101/152; R-18/34 (e.g. small test teachers) load the same way
RESNET_TEACHERS = ("resnet50", "resnet101", "resnet152", "resnet18", "resnet34")
TEACHER_ARCHS = RESNET_TEACHERS + tuple(SWAV_TEACHERS)

# (prefix of the teacher's own keys, patterns of keys deliberately left out), per layout
MOCO_LAYOUTS = (("module.encoder_q.", (r"module\.encoder_k\..*", r"module\.queue", r"module\.queue_ptr")),
                ("encoder_q.", (r"encoder_k\..*", r"queue", r"queue_ptr")))
SWAV_LAYOUTS = (("module.", (r"module\.prototypes(\..*)?",)),
                ("", (r"prototypes(\..*)?",)))


@dataclass
class TeacherInfo:
    path: str
    arch: str
    sha256: str
    layout: str                        # the key prefix the teacher was read from
    head: str                          # e.g. "MLP 2048-2048-128"
    dropped: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """What checkpoints keep about the teacher (``teacher_info``)."""
        return {"path": self.path, "arch": self.arch, "sha256": self.sha256}


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_arch(arch: str) -> None:
    if arch not in TEACHER_ARCHS:
        raise UserError(f"unknown --teacher_arch {arch!r}; choose from {', '.join(TEACHER_ARCHS)}")


def _resnet_head(sub: Mapping[str, torch.Tensor], arch: str, source: str, sd: Mapping[str, torch.Tensor]) -> tuple[nn.Module, str]:
    """The ``fc`` the checkpoint holds: MoCo v2's MLP (``fc.0``, ``fc.2``) or a linear layer."""
    F = feat_dim(arch)
    if "fc.0.weight" in sub and "fc.2.weight" in sub:
        h, out = sub["fc.0.weight"].shape[0], sub["fc.2.weight"].shape[0]
        return nn.Sequential(nn.Linear(F, h), nn.ReLU(inplace=True), nn.Linear(h, out)), f"MLP {F}-{h}-{out}"
    if "fc.0.weight" in sub:  # DisCo ``--hidden 0``: Sequential(Linear)
        out = sub["fc.0.weight"].shape[0]
        return nn.Sequential(nn.Linear(F, out)), f"linear {F}-{out}"
    if "fc.weight" in sub:
        out = sub["fc.weight"].shape[0]
        return nn.Linear(F, out), f"linear {F}-{out}"
    raise UserError(f"teacher {source} has no projection head (no fc.* keys under the encoder): a DisCo "
                    f"teacher needs its 128-d MoCo head.{_hint(sd, arch)}")


def build_teacher(arch: str, head: nn.Module | None = None, dim: int = 128, cifar_stem: bool = False) -> nn.Module:
    """The teacher network for ``arch`` (ResNets: with ``head`` as ``fc``, and the CIFAR stem when the
    checkpoint has it; SwAV-format: SwAV's BN head and L2-normalised output, as DisCo builds them with
    ``normalize=True``)."""
    _check_arch(arch)
    if arch in SWAV_TEACHERS:
        widen, hidden = SWAV_TEACHERS[arch]
        model = build_encoder(arch, swav_projection_head(feat_dim(arch), hidden, dim))
        model.l2norm = True
        return model
    return build_encoder(arch, head if head is not None else nn.Identity(), cifar_stem=cifar_stem)


def _layout(sd: Mapping[str, torch.Tensor], arch: str) -> tuple[str, tuple[str, ...]]:
    """(prefix, drop patterns) of the first layout whose prefix some key has (else no prefix)."""
    layouts = SWAV_LAYOUTS if arch in SWAV_TEACHERS else MOCO_LAYOUTS
    for prefix, drop in layouts:
        if prefix and any(k.startswith(prefix) for k in sd):
            return prefix, drop
    return layouts[-1] if arch in SWAV_TEACHERS else ("", ())


def _hint(sd: Mapping[str, torch.Tensor], arch: str) -> str:
    keys = list(sd)
    if arch in SWAV_TEACHERS and any(".encoder_q." in k or k.startswith("encoder_q.") for k in keys):
        return " The file looks like a MoCo-style checkpoint: use --teacher_arch resnet50/101/152."
    if arch in RESNET_TEACHERS and any(k.startswith(("module.projection_head", "projection_head")) for k in keys):
        return " The file looks like a SwAV-format state dict: use --teacher_arch SWAVresnet50/DCresnet50/SELAresnet50/resnet50w2."
    return ""


def _names(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_teacher(path: str, arch: str, dim: int = 128) -> tuple[nn.Module, TeacherInfo]:
    """Build the ``arch`` teacher and load ``path`` into it, strictly (module docstring). Returns the
    teacher (frozen: ``requires_grad=False``) and what was loaded."""
    _check_arch(arch)
    if not path:
        raise UserError("--teacher is required: the checkpoint of the frozen teacher")
    path = resolve(path, "teacher checkpoint")  # a URL or zoo name: the cached file (hash and path recorded)
    sd = {k: v for k, v in extract_state_dict(load_checkpoint(path)).items()}
    prefix, drop = _layout(sd, arch)
    sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    dropped = sorted(k for k in sd if any(re.fullmatch(p, k) for p in drop))
    sub = {k: v for k, v in sub.items() if prefix + k not in set(dropped)}
    outside = sorted(k for k in sd if not k.startswith(prefix) and k not in set(dropped))
    if arch in SWAV_TEACHERS:
        model = build_teacher(arch, dim=dim)
        widen, hidden = SWAV_TEACHERS[arch]
        head_desc = f"SwAV BN head {feat_dim(arch)}-{hidden}-{dim}, L2-normalised"
    else:
        head, head_desc = _resnet_head(sub, arch, path, sd)
        stem = has_cifar_stem(sub)   # a teacher pretrained with --dataset cifar10/... (3x3 stem)
        model = build_teacher(arch, head, cifar_stem=stem)
        head_desc += ", CIFAR stem" if stem else ""
    want = model.state_dict()
    missing = [k for k in want if k not in sub]
    shape = [k for k in want if k in sub and tuple(sub[k].shape) != tuple(want[k].shape)]
    unexpected = [prefix + k for k in sub if k not in want] + outside
    if missing or shape or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_names([prefix + k for k in missing])})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} mis-shaped (e.g. {prefix + k}: file {tuple(sub[k].shape)} vs "
                         f"{arch} {tuple(want[k].shape)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        raise UserError(f"teacher {path} does not fit --teacher_arch {arch} (keys read under {prefix!r}): "
                        f"{'; '.join(parts)}.{_hint(sd, arch)}")
    out_dim = (model.fc if arch in RESNET_TEACHERS else model.projection_head)
    last = [m for m in out_dim.modules() if isinstance(m, nn.Linear)][-1]
    if last.out_features != dim:
        raise UserError(f"teacher {path} embeds in {last.out_features} dims, the student in --moco-dim {dim}: "
                        "the distillation needs the same output dimension")
    load_into_encoder(model, {prefix + k: v for k, v in sub.items()}, arch, source=path)  # strict, every key
    model.requires_grad_(False)
    info = TeacherInfo(path=os.path.abspath(path), arch=arch, sha256=file_sha256(path), layout=prefix,
                       head=head_desc, dropped=dropped)
    log.info("teacher %s from %s (keys %r, head %s, sha256 %s); deliberately not loaded: %s", arch, path,
             prefix, head_desc, info.sha256[:12], _summarise(dropped) or "nothing")
    return model, info


def _summarise(keys: list[str]) -> str:
    """``module.encoder_k.* (320 keys), module.queue`` …"""
    groups: dict[str, int] = {}
    for k in keys:
        m = re.match(r"((?:module\.)?(?:encoder_k|prototypes))\.", k)
        g = m.group(1) + ".*" if m else k
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g} ({n} keys)" if n > 1 else g for g, n in groups.items())
