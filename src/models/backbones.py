"""Backbone registry.

An *encoder* is the full network as the official code builds it: a torchvision ResNet whose ``fc``
is (later) replaced by a projection head, or a timm EfficientNet/MobileNetV3 whose ``classifier``
is. Keeping that structure keeps the official state-dict names (``encoder_q.conv1.weight``,
``encoder_q.fc.0.weight``, ``encoder_q.classifier.0.weight``), so official checkpoints load here and
ours load in the official tools.

``build_backbone(arch)`` returns the encoder with an identity head: its output is the pooled feature
of dimension ``feat_dim(arch)`` (specs/disco_pcl_evals.md A5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
import torchvision.models as tvm

from ..errors import UserError
from .convnet import WIDTH as CONV4_WIDTH
from .convnet import conv4
from .swav_resnet import SWAV_TEACHERS, swav_resnet50


@dataclass(frozen=True)
class ArchSpec:
    builder: Callable[..., nn.Module]
    feat_dim: int
    head_attr: str  # the attribute that holds the classifier / projection head
    family: str     # "resnet", "swav_resnet" (a ResNet with SwAV's stem), "timm" or "convnet"


def _tv(name: str) -> Callable[..., nn.Module]:
    def build(zero_init_residual: bool = False, **_) -> nn.Module:
        return getattr(tvm, name)(weights=None, zero_init_residual=zero_init_residual)
    return build


def _timm(name: str) -> Callable[..., nn.Module]:
    def build(**_) -> nn.Module:
        import timm  # imported lazily: ResNet-only runs do not pay for it
        # drop_rate / drop_path_rate 0 as in DisCo's vendored timm (A5); num_classes=0 → pooled features
        return timm.create_model(name, pretrained=False, num_classes=0, drop_rate=0.0, drop_path_rate=0.0)
    return build


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(_tv("resnet18"), 512, "fc", "resnet"),
    "resnet34": ArchSpec(_tv("resnet34"), 512, "fc", "resnet"),
    "resnet50": ArchSpec(_tv("resnet50"), 2048, "fc", "resnet"),
    "resnet101": ArchSpec(_tv("resnet101"), 2048, "fc", "resnet"),
    "resnet152": ArchSpec(_tv("resnet152"), 2048, "fc", "resnet"),
    # LORAC's ``models/backbones/resnet.py`` is torchvision's v1.5 ResNet (moco_m_lorac.md §1.1)
    "mocom_r18": ArchSpec(_tv("resnet18"), 512, "fc", "resnet"),
    "mocom_r50": ArchSpec(_tv("resnet50"), 2048, "fc", "resnet"),
    # DisCo names (disco_pcl_evals.md A5): timm models, pooled feature 1280
    "efficientb0": ArchSpec(_timm("efficientnet_b0"), 1280, "classifier", "timm"),
    "efficientb1": ArchSpec(_timm("efficientnet_b1"), 1280, "classifier", "timm"),
    "mobilenetv3": ArchSpec(_timm("mobilenetv3_large_100"), 1280, "classifier", "timm"),
    # a CPU-sized backbone for smoke runs and the learning check (src/models/convnet.py); no paper's
    "conv4": ArchSpec(conv4, CONV4_WIDTH, "fc", "convnet"),
}
# SwAV's ResNet variant (extra stem padding, ``widen``; head attribute ``projection_head``): DisCo's
# SwAV / DeepCluster-v2 / SeLa-v2 teachers (disco_pcl_evals.md A2, A5); loadable from the raw state dicts
for _name, (_widen, _) in SWAV_TEACHERS.items():
    ARCHS[_name] = ArchSpec(swav_resnet50(_widen), 2048 * _widen, "projection_head", "swav_resnet")
#: other names of the same network (resume accepts a checkpoint written under any of them)
ALIASES = {"mocom_r18": "resnet18", "mocom_r50": "resnet50", "efficientnet_b0": "efficientb0",
           "efficientnet_b1": "efficientb1", "mobilenetv3_large_100": "mobilenetv3"}
for _alias, _name in ALIASES.items():
    ARCHS.setdefault(_alias, ARCHS[_name])


def canonical_arch(arch: str) -> str:
    """One name per network: ``mocom_r50`` → ``resnet50``, ``efficientnet_b0`` → ``efficientb0``."""
    return ALIASES.get(arch, arch)


def arch_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose from {', '.join(sorted(ARCHS))}")
    return ARCHS[arch]


def feat_dim(arch: str) -> int:
    return arch_spec(arch).feat_dim


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """3×3 stride-1 first conv and no max-pool (the usual CIFAR ResNet stem)."""
    if not hasattr(model, "conv1") or not hasattr(model, "maxpool") or hasattr(model, "padding"):
        raise UserError("--cifar_stem is only available for ResNet archs")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_encoder(arch: str, head: nn.Module | None = None, *, cifar_stem: bool = False,
                  zero_init_residual: bool = False) -> nn.Module:
    """The full encoder with ``head`` in place of the classifier (identity when ``head`` is None).
    ``encoder.feat_dim`` is the pooled feature dimension."""
    spec = arch_spec(arch)
    model = spec.builder(zero_init_residual=zero_init_residual)
    if cifar_stem:
        apply_cifar_stem(model)
    setattr(model, spec.head_attr, head if head is not None else nn.Identity())
    model.feat_dim = spec.feat_dim
    return model


def build_backbone(arch: str, *, cifar_stem: bool = False) -> nn.Module:
    """Encoder without head: ``forward`` returns the pooled ``feat_dim`` feature."""
    return build_encoder(arch, None, cifar_stem=cifar_stem)


def head_attr(arch: str) -> str:
    return arch_spec(arch).head_attr


def sync_bn_plan(mode: str, group_size: int, device) -> tuple[bool, object, str]:
    """What ``--sync_bn pytorch|apex`` does here: (convert?, process group, description for the log).
    ``apex`` means groups of ``group_size`` processes (``torch.distributed.new_subgroups``). PyTorch's
    SyncBatchNorm runs only on GPU: on CPU (and in a single process) the BN stays per process."""
    import logging

    import torch.distributed as dist
    if mode not in ("pytorch", "apex"):
        return False, None, "none"
    if not (dist.is_available() and dist.is_initialized()):
        return False, None, "single process: plain BatchNorm"
    if getattr(device, "type", str(device)) == "cpu":
        logging.getLogger("ssl").warning("--sync_bn %s: torch.nn.SyncBatchNorm does not run on CPU; keeping "
                                         "per-process BatchNorm", mode)
        return False, None, "CPU: per-process BatchNorm"
    ws = dist.get_world_size()
    if mode == "apex" and group_size < ws and ws % group_size == 0:
        group, _ = dist.new_subgroups(group_size)
        return True, group, f"SyncBatchNorm over groups of {group_size} processes (apex's grouping)"
    return True, None, "SyncBatchNorm over all processes"


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """SyncBatchNorm for every BatchNorm of ``module``, including timm's fused norm+activation layers
    (``BatchNormAct2d`` → ``SyncBatchNormAct``). ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    turns a ``BatchNormAct2d`` into a plain ``SyncBatchNorm`` and silently drops its activation (the
    SiLU / hard-swish of EfficientNet and MobileNetV3); timm's converter keeps it. State-dict names
    are unchanged."""
    try:
        from timm.layers import convert_sync_batchnorm as timm_convert
    except ImportError:  # pragma: no cover - timm is a requirement; ResNets need no special case
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return timm_convert(module, process_group)
