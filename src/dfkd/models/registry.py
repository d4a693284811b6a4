"""The classifier registry: :data:`MODELS` and :func:`create_model` (its own module, so that the model files can
register themselves without importing the package that imports them)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dfkd.errors import ConfigError
from dfkd.registry import Registry

MODELS: Registry[Callable[[int, int], nn.Module]] = Registry("model")


def create_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build a registered classifier with its default initialisation.

    The returned module carries its registry name in ``model.arch``; :func:`load_weights` uses it in messages.

    Args:
        name: Registry name, see :func:`model_names` (e.g. ``"resnet34"``, ``"wrn40_2"``, ``"lenet5"``).
        num_classes: Number of output logits.
        in_channels: Number of input image channels (1 for MNIST, 3 for CIFAR).

    Returns:
        The network; it expects normalised images (wrap it in :class:`Normalized` to feed [0, 1] images).

    Raises:
        ConfigError: Unknown name (with a "did you mean" hint) or non-positive sizes.

    Example:
        >>> import torch
        >>> from dfkd.models import create_model
        >>> model = create_model("wrn16_1", num_classes=100)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """
    builder = MODELS.get(name)
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(f"model '{name}' needs num_classes and in_channels >= 1, got {num_classes}, {in_channels}")
    model = builder(num_classes, in_channels)
    model.arch = name
    return model


def model_names() -> list[str]:
    """The registered classifier names, sorted."""
    return MODELS.names()


def describe_model(name: str) -> str:
    """One line saying what the model ``name`` is (for ``dfkd list models``).

    Raises:
        ConfigError: Unknown name.
    """
    doc = MODELS.get(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else name
