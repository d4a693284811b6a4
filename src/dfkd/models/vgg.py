"""CIFAR VGG-11 with BatchNorm, as in RepDistiller and the CMI benchmark (``vgg11_bn``).

Five conv groups ``block0..block4``; the last ReLU of each group is applied in ``forward`` rather than inside the
group (so a hook on a group sees pre-activation features, as RepDistiller intended). Global average pooling
replaces VGG's MLP head. Parameter names match CMI's ``vgg.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd.models.registry import MODELS

# Configuration "A" (VGG-11): the conv widths of each group.
_VGG11 = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def _group(c_in: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_out in widths:
        layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for 32x32 (and 64x64) inputs: max-pool after groups 0-2 (and 3 at 64 px), avg-pool, linear."""

    def __init__(self, cfg: tuple[tuple[int, ...], ...], num_classes: int, in_channels: int):
        super().__init__()
        self.block0 = _group(in_channels, cfg[0])
        self.block1 = _group(cfg[0][-1], cfg[1])
        self.block2 = _group(cfg[1][-1], cfg[2])
        self.block3 = _group(cfg[2][-1], cfg[3])
        self.block4 = _group(cfg[3][-1], cfg[4])
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # RepDistiller's init: He-normal (fan-out) convs with zero bias, BN at identity, small-normal linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        # The fourth pool only runs on 64-px (Tiny-ImageNet) inputs, so block4 always works at 4x4 or less.
        large = x.shape[-2] >= 64
        x = self.pool(F.relu(self.block0(x)))
        x = self.pool(F.relu(self.block1(x)))
        x = self.pool(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if large:
            x = self.pool(x)
        x = F.relu(self.block4(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@MODELS.register("vgg11")
@MODELS.register("vgg11_bn")
def vgg11(num_classes: int, in_channels: int) -> nn.Module:
    """VGG-11 with BatchNorm (RepDistiller/CMI vgg11_bn, avg-pool head), 9.2M params, 32x32 inputs."""
    return VGG(_VGG11, num_classes, in_channels)
