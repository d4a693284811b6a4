"""Input normalisation as part of the model.

Convention of the whole library: every image tensor outside a model (real batches, generator outputs, the synthetic
pool) lies in [0, 1]. Teacher and student are wrapped in :class:`Normalized`, which applies the dataset's
per-channel mean/std, so no method ever has to remember to normalise. Checkpoints store the inner ``net`` only,
which keeps their keys identical to the CMI zoo.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dfkd.errors import ConfigError


def _channel_stat(values: Sequence[float] | Tensor, name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() == 0:
        raise ConfigError(f"Normalized needs at least one {name} value, got none")
    return t.view(1, -1, 1, 1)


class Normalized(nn.Module):
    """A network that takes images in [0, 1] and normalises them with a per-channel mean and std first.

    Args:
        net: The classifier that expects normalised inputs.
        mean: Per-channel mean, one value per input channel.
        std: Per-channel standard deviation, same length as ``mean``, all positive.

    Example:
        >>> import torch
        >>> from dfkd.models import Normalized, create_model
        >>> model = Normalized(create_model("tiny_cnn"), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        >>> model(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor):
        super().__init__()
        mean_t, std_t = _channel_stat(mean, "mean"), _channel_stat(std, "std")
        if mean_t.shape != std_t.shape:
            raise ConfigError(f"Normalized got {mean_t.shape[1]} mean values but {std_t.shape[1]} std values")
        if bool((std_t <= 0).any()):
            raise ConfigError(f"Normalized needs positive std values, got {std_t.flatten().tolist()}")
        self.net = net
        # Non-persistent: the dataset defines these, and the checkpoint must keep the plain CMI keys.
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        """Map images in [0, 1] to the network's input space."""
        return (x - self.mean) / self.std

    def denormalize(self, x_norm: Tensor) -> Tensor:
        """Map normalised images back to [0, 1] (the inverse of :meth:`normalize`)."""
        return x_norm * self.std + self.mean

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}"
