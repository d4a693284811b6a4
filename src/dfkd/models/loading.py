"""Building a network from what a config names (a zoo name or a source spec, a weights file or a run folder), and
finding the layers that methods hook (the classifier, the BatchNorms)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from dfkd.errors import CheckpointError, DfkdError
from dfkd.models.registry import MODELS, create_model
from dfkd.models.sources import build_source, is_external_arch
from dfkd.models.weights import _arch_name, _inner, _last_linear, load_weights, read_weights


def resolve_weights(path: str) -> Path:
    """A checkpoint path, or a run directory, whose ``ckpt/last.pt`` is used: the run's final weights.

    Not ``best.pt``: that epoch was chosen by its score on the run's evaluation split (the test set unless
    ``eval.split=val``), so a score measured on that split again is not a fresh one. Name the file to use it.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        last = p / "ckpt" / "last.pt"
        if last.is_file():
            return last
        raise CheckpointError(f"{p} is a directory without ckpt/last.pt: give a checkpoint file or a finished run")
    if not p.is_file():
        raise CheckpointError(f"weights file {p} does not exist")
    return p


def build_network(
    arch: str | nn.Module,
    num_classes: int = 10,
    in_channels: int = 3,
    weights: str | os.PathLike[str] | None = None,
    *,
    role: str = "",
    trust_code: bool = False,
) -> nn.Module:
    """Create a network (or take one as is) and fill it from a weights file.

    Args:
        arch: A registered model name, a source spec (``timm:``, ``torchvision:``, ``hub:``, ``torchscript:``,
            ``py:``; see :mod:`dfkd.models.sources`, which attaches the source's metadata), or a module to use as is
            (``num_classes``/``in_channels`` are then ignored).
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        weights: Path of a weights file (see :func:`read_weights`), or None to keep the fresh init.
        role: Word naming the network in error messages, e.g. ``"teacher"``.
        trust_code: Run the code that a ``hub:``, ``torchscript:`` or ``py:`` spec names (refused without it).

    Returns:
        The network (not wrapped in :class:`~dfkd.models.Normalized`).

    Raises:
        ConfigError: Unknown architecture name; a source that runs code without ``trust_code``.
        CheckpointError: The file cannot be read, records another architecture in its ``arch`` entry, or does not
            fit the network.

    Example:
        >>> from dfkd.models import build_network
        >>> build_network("wrn16_1", num_classes=100).fc.out_features
        100
    """
    if is_external_arch(arch):
        return build_source(str(arch), weights, num_classes=num_classes, role=role, trust_code=trust_code)
    net = arch if isinstance(arch, nn.Module) else create_model(arch, num_classes, in_channels)
    if weights is None:
        return net
    state, meta = read_weights(weights)
    source = f"{role} checkpoint {weights}" if role else f"checkpoint {weights}"
    file_arch = meta.get("arch")
    if (
        isinstance(arch, str)
        and isinstance(file_arch, str)
        and file_arch in MODELS
        and MODELS.get(file_arch) is not MODELS.get(arch)
    ):
        raise CheckpointError(
            f"{source} holds a {file_arch} (its 'arch' entry) but {arch} was asked for; set the architecture to "
            f"{file_arch} or use another checkpoint"
        )
    load_weights(net, state, source)
    return net


def classifier_module(model: nn.Module) -> nn.Linear:
    """The linear layer whose input is the network's penultimate feature (hook it to capture that feature).

    This is the last ``nn.Linear`` of the model, except for models that name another one in a ``feature_head``
    attribute: a LeNet returns ``fc.0``, whose input is the 120-d (60-d) conv feature that DAFL's activation loss
    uses, not the 84-d hidden layer. Do not read the class count from its ``out_features``.

    Args:
        model: A network, possibly wrapped in :class:`~dfkd.models.Normalized`.

    Returns:
        The linear layer.

    Raises:
        DfkdError: The model has no ``nn.Linear``.
    """
    net = _inner(model)
    name = getattr(net, "feature_head", None)
    if isinstance(name, str):
        head = net.get_submodule(name)
        if isinstance(head, nn.Linear):
            return head
    last = _last_linear(net)
    if last is None:
        raise DfkdError(f"{_arch_name(net)} has no nn.Linear layer, so it has no penultimate feature to hook")
    return last[1]


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """All ``nn.BatchNorm2d`` layers of ``model`` in definition order (e.g. for DeepInversion's BN-statistics hooks).

    Args:
        model: Any network.

    Returns:
        The layers; empty for networks without BatchNorm (the plain LeNets).
    """
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
