"""Conv-4: the four-block ConvNet of few-shot learning, as a CPU-sized backbone (``-a conv4``).

Four blocks of 3×3 convolution (64 channels, padding 1) → BatchNorm → ReLU → 2×2 max-pool, the
backbone of Matching Networks (Vinyals et al., 2016) and Prototypical Networks (Snell et al., 2017),
followed here by a global average pool so that any input size gives the same 64-d feature (those
papers flatten the 5×5 map of their 84 px inputs). About 113 k parameters: a step of a contrastive
method on 16–32 px crops costs milliseconds on a laptop CPU.

It is not a backbone of any of the papers reproduced here. It is for what a ResNet is too slow for on
a CPU: smoke runs of a new data set or flag, teaching, and the learning check of
``tests/test_learning_check.py`` (a short MoCo v2 run must beat the random encoder's kNN within
seconds; docs/small_images.md). The conv layers have no bias (the BN that follows has one) and keep
PyTorch's default initialisation. Like the ResNets, the classifier slot is ``fc`` (an identity until
a method puts its projection head there), so checkpoints read ``encoder_q.features.0.weight`` …
``encoder_q.fc.0.weight``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

WIDTH = 64
BLOCKS = 4


class Conv4(nn.Module):
    """Conv-4 with a global average pool; ``forward`` returns ``fc(pooled 64-d feature)``."""

    def __init__(self, width: int = WIDTH, blocks: int = BLOCKS):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def conv4(**_) -> Conv4:
    """The registry's builder (ResNet-only options such as ``zero_init_residual`` do not apply)."""
    return Conv4()
