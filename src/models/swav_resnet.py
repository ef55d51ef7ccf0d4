"""The ResNet variant of SwAV / DeepCluster-v2 / SeLa-v2 (facebookresearch/swav ``src/resnet50.py``),
which DisCo uses for its ``resnet50w2``, ``SWAVresnet50``, ``DCresnet50`` and ``SELAresnet50`` teachers
(disco_pcl_evals.md A2, D1.7).

Differences from torchvision's ResNet:

- the stem pads the image by one pixel (``padding = ConstantPad2d(1, 0)``) and ``conv1`` then uses
  padding 2 instead of 3 (same output size, a zero border of 3 pixels in all);
- ``widen`` multiplies *every* width (stem, the planes of each stage, hence the output): ``widen=2``
  gives a 128-channel stem and a 4096-d pooled feature (torchvision's ``wide_resnet50_2`` widens
  only the inner 3×3 convolutions and keeps 2048);
- the projection head is ``projection_head`` = Linear(F, hidden) → BatchNorm1d → ReLU → Linear(hidden,
  out), optionally followed by L2 normalisation (``l2norm``); SwAV's ``prototypes`` layer is not built
  (DisCo uses ``nmb_prototypes=0``), so official checkpoints' ``prototypes.*`` keys are dropped.

State-dict names are those of the official raw checkpoints without their ``module.`` prefix
(``conv1.weight``, ``layer4.2.bn3.running_var``, ``projection_head.0.weight``, ``projection_head.1.running_mean``).
The residual blocks are torchvision's ``Bottleneck`` (identical names and computation).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck


class SwAVResNet(nn.Module):
    """ResNet-50 ``× widen`` with SwAV's stem; ``forward`` returns the head output (the pooled feature
    when the head is ``nn.Identity``), L2-normalised when ``l2norm`` is set."""

    def __init__(self, layers=(3, 4, 6, 3), widen: int = 1, head: nn.Module | None = None, l2norm: bool = False):
        super().__init__()
        width = 64 * widen
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inplanes = width
        self.layer1 = self._make_layer(width, layers[0], 1)
        self.layer2 = self._make_layer(width * 2, layers[1], 2)
        self.layer3 = self._make_layer(width * 4, layers[2], 2)
        self.layer4 = self._make_layer(width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feat_dim = width * 8 * Bottleneck.expansion
        self.projection_head = head if head is not None else nn.Identity()
        self.l2norm = l2norm
        for m in self.modules():  # SwAV's init: He (fan_out) convolutions, BN weight 1 / bias 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        out = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        out += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection_head(self.forward_backbone(x))
        return F.normalize(x, dim=1, p=2) if self.l2norm else x


def swav_projection_head(in_dim: int, hidden: int, out_dim: int = 128) -> nn.Sequential:
    """SwAV's head: Linear(F, hidden) → BN1d → ReLU → Linear(hidden, out) (names ``0 1 3``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


#: DisCo's SwAV-format teachers (disco_pcl_evals.md A2): arch → (widen, hidden width of the head)
SWAV_TEACHERS: dict[str, tuple[int, int]] = {
    "resnet50w2": (2, 8192),
    "SWAVresnet50": (1, 2048),
    "DCresnet50": (1, 2048),
    "SELAresnet50": (1, 2048),
}


def swav_resnet50(widen: int = 1):
    """Registry builder (``build_encoder`` puts the head in ``projection_head`` afterwards)."""
    def build(zero_init_residual: bool = False, **_) -> SwAVResNet:
        model = SwAVResNet(widen=widen)
        if zero_init_residual:
            for m in model.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
        return model
    return build
