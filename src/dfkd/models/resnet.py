"""CIFAR ResNet-18/34 in the DAFL variant used by the CMI benchmark (and DFAD, DFQ, CuDFKD).

Unlike the ImageNet ResNet, the stem is a single stride-1 3x3 conv with no max-pool, so a 32x32 input reaches the
last stage at 4x4. Parameter names match CMI's ``resnet.py``, so its published teachers load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.models.registry import MODELS


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual; the shortcut is a strided 1x1 conv + BN when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        # An empty Sequential is the identity and, like CMI's, adds no keys to the state dict.
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stage(c_in: int, c_out: int, n: int, stride: int) -> nn.Sequential:
    # Only the first block changes resolution and width.
    return nn.Sequential(BasicBlock(c_in, c_out, stride), *(BasicBlock(c_out, c_out, 1) for _ in range(n - 1)))


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, four stages of :class:`BasicBlock` (64/128/256/512, strides 1/2/2/2), avg-pool, linear."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _stage(64, 64, blocks[0], stride=1)
        self.layer2 = _stage(64, 128, blocks[1], stride=2)
        self.layer3 = _stage(128, 256, blocks[2], stride=2)
        self.layer4 = _stage(256, 512, blocks[3], stride=2)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """CIFAR ResNet-18 (DAFL/CMI layout: 3x3 stem, no max-pool), 11.2M params, 32x32 inputs."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


@MODELS.register("resnet34")
def resnet34(num_classes: int, in_channels: int) -> nn.Module:
    """CIFAR ResNet-34 (DAFL/CMI layout: 3x3 stem, no max-pool), 21.3M params, 32x32 inputs."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels)
