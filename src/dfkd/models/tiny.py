"""A two-conv BatchNorm network for smoke tests and quick CPU experiments."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfkd.models.registry import MODELS


class TinyCNN(nn.Module):
    """Conv3x3(16)-BN-ReLU-MaxPool2-Conv3x3(32)-BN-ReLU, global avg-pool, linear; any input of 4x4 or more."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


@MODELS.register("tiny_cnn")
def tiny_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """Two conv-BN layers and a linear head (5.5k params), any input size >= 4; for smoke tests and quick runs."""
    return TinyCNN(num_classes, in_channels)
