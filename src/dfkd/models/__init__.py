"""Model zoo, generators and weight loading.

Classifiers are built by name with :func:`create_model`; the names and parameter names follow the CMI benchmark
zoo (``resnet34``, ``wrn40_2``, ``vgg11``, ``lenet5``, ...) so that its published teacher checkpoints load with
``strict=True``. Every builder registered in :data:`MODELS` has the signature
``fn(num_classes: int, in_channels: int) -> nn.Module``, and every ``forward`` is a plain ``forward(x)``: features
are captured with forward hooks (see :func:`classifier_module` and :func:`bn_layers`).
"""

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


# The model modules import MODELS to register themselves, so they must come after it.
from dfkd.models import lenet, resnet, tiny, vgg, wrn  # noqa: E402, F401
from dfkd.models.generators import GENERATORS, create_generator, init_dcgan_  # noqa: E402
from dfkd.models.loading import (  # noqa: E402
    bn_layers,
    build_network,
    classifier_module,
    load_weights,
    read_weights,
)
from dfkd.models.wrapper import Normalized  # noqa: E402

__all__ = [
    "GENERATORS",
    "MODELS",
    "Normalized",
    "bn_layers",
    "build_network",
    "classifier_module",
    "create_generator",
    "create_model",
    "describe_model",
    "init_dcgan_",
    "load_weights",
    "model_names",
    "read_weights",
]
