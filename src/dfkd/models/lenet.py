"""LeNet-5 and LeNet-5-half of DAFL (MNIST), key-compatible with the CMI zoo, plus BatchNorm variants.

The plain nets have no BatchNorm, so BN-statistics methods (DeepInversion, CMI, CuDFKD) have nothing to match on
them; the ``*_bn`` variants exist for those methods. All four expect 32x32 inputs (MNIST is resized to 32).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfkd.errors import DfkdError
from dfkd.models.registry import MODELS


def _features(in_channels: int, widths: tuple[int, int, int], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = in_channels
    for i, c_out in enumerate(widths):
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=5, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU())
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        c_in = c_out
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """Three 5x5 convs (the last one maps 5x5 to 1x1) and a two-layer MLP head.

    Without BatchNorm the key names are those of DAFL/CMI (``features.0/3/6``, ``fc.0/2``); with it, each BN sits
    right after its conv inside ``features``.
    """

    # classifier_module() hooks this layer: DAFL's "feature" of a LeNet is the conv output entering the MLP head.
    feature_head = "fc.0"

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, int, int], hidden: int, batch_norm: bool):
        super().__init__()
        self.features = _features(in_channels, widths, batch_norm)
        self.fc = nn.Sequential(nn.Linear(widths[-1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (32, 32):
            raise DfkdError(
                f"LeNet-5 needs 32x32 inputs, got {x.shape[-2]}x{x.shape[-1]}; resize the images to 32 (as DAFL does)"
            )
        return self.fc(torch.flatten(self.features(x), 1))


@MODELS.register("lenet5")
def lenet5(num_classes: int, in_channels: int) -> nn.Module:
    """LeNet-5 of DAFL (convs 6/16/120, MLP 84), 61.7k params, 32x32 inputs (MNIST teacher)."""
    return LeNet5(num_classes, in_channels, (6, 16, 120), 84, batch_norm=False)


@MODELS.register("lenet5_half")
def lenet5_half(num_classes: int, in_channels: int) -> nn.Module:
    """LeNet-5-half of DAFL (convs 3/8/60, MLP 42), 15.7k params, 32x32 inputs (MNIST student)."""
    return LeNet5(num_classes, in_channels, (3, 8, 60), 42, batch_norm=False)


@MODELS.register("lenet5_bn")
def lenet5_bn(num_classes: int, in_channels: int) -> nn.Module:
    """LeNet-5 with a BatchNorm after each conv (for BN-statistics methods), 32x32 inputs."""
    return LeNet5(num_classes, in_channels, (6, 16, 120), 84, batch_norm=True)


@MODELS.register("lenet5_half_bn")
def lenet5_half_bn(num_classes: int, in_channels: int) -> nn.Module:
    """LeNet-5-half with a BatchNorm after each conv (for BN-statistics methods), 32x32 inputs."""
    return LeNet5(num_classes, in_channels, (3, 8, 60), 42, batch_norm=True)
