"""Pre-activation Wide ResNets WRN-d-k of ZSKT, as used by the CMI benchmark (``wresnet.py``).

Parameter names (``block1.layer.0.bn1``, ``convShortcut``, ``fc``) and the He-normal init follow CMI, so its
published WRN teachers load with ``strict=True``. CMI's dropout rate is 0 everywhere, so there is no dropout here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.errors import ConfigError
from dfkd.models.registry import MODELS


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with a residual.

    When the width changes, the pre-activation is shared: the 1x1 shortcut conv also sees ``relu(bn1(x))``
    (ZSKT's layout); otherwise the shortcut is the raw input.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        # Camel case because it is CMI's key name.
        self.convShortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One group of ``n`` blocks; holds them under ``.layer`` so keys read ``blockG.layer.I.*`` as in CMI."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            PreActBlock(c_in, c_out, stride), *(PreActBlock(c_out, c_out, 1) for _ in range(n - 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Stem conv, three groups (widths 16k/32k/64k, strides 1/2/2), final BN-ReLU, avg-pool, linear."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ConfigError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], stride=1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], stride=2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # ZSKT's init: He-normal with fan-out, BN at identity, zero linear bias (linear weight keeps torch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@MODELS.register("wrn16_1")
def wrn16_1(num_classes: int, in_channels: int) -> nn.Module:
    """Wide ResNet 16-1 (ZSKT/CMI pre-activation layout), 0.18M params, 32x32 inputs."""
    return WideResNet(16, 1, num_classes, in_channels)


@MODELS.register("wrn16_2")
def wrn16_2(num_classes: int, in_channels: int) -> nn.Module:
    """Wide ResNet 16-2 (ZSKT/CMI pre-activation layout), 0.69M params, 32x32 inputs."""
    return WideResNet(16, 2, num_classes, in_channels)


@MODELS.register("wrn40_1")
def wrn40_1(num_classes: int, in_channels: int) -> nn.Module:
    """Wide ResNet 40-1 (ZSKT/CMI pre-activation layout), 0.56M params, 32x32 inputs."""
    return WideResNet(40, 1, num_classes, in_channels)


@MODELS.register("wrn40_2")
def wrn40_2(num_classes: int, in_channels: int) -> nn.Module:
    """Wide ResNet 40-2 (ZSKT/CMI pre-activation layout), 2.2M params, 32x32 inputs."""
    return WideResNet(40, 2, num_classes, in_channels)
