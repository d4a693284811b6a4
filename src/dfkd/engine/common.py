"""Set-up shared by the commands: networks, data on the device, run directories, the progress bar."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dfkd.data import DatasetInfo, load_split
from dfkd.engine.env import Env
from dfkd.errors import ConfigError
from dfkd.models import Normalized, build_network
from dfkd.models.loading import resolve_weights
from dfkd.models.meta import teacher_meta

log = logging.getLogger("dfkd")


def build_model(
    arch: str | nn.Module,
    info: DatasetInfo,
    env: Env,
    weights: str | None = None,
    role: str = "model",
    trust_code: bool = False,
    *,
    data_wins: bool = False,
) -> Normalized:
    """Create (or take) a network for ``info``, load ``weights``, wrap it so it takes [0, 1] images.

    A network whose source states its own mean/std (:func:`~dfkd.models.meta.teacher_meta`, e.g. a timm model) is
    normalised with those, any other with the dataset's. ``trust_code``: see :func:`~dfkd.models.build_network`.
    ``data_wins``: ``info`` is a data-free run's (see :func:`~dfkd.data.datafree.resolve_dataset_info`), whose image
    size and mean/std the config may have set over the network's own (a teacher run at another resolution): use them;
    only the channel count must agree.
    """
    if isinstance(arch, str) and not arch:
        raise ConfigError(f"{role}.arch is not set: name an architecture (`dfkd list models`)")
    path = str(resolve_weights(weights)) if weights else None
    net = build_network(arch, info.num_classes, info.image_shape[0], path, role=role, trust_code=trust_code)
    mean, std = _normalisation(net, info, role, data_wins)
    model = Normalized(net, mean, std).to(env.device)
    _check_output(model, info, env, role)  # before prepare: a compiled network would compile for this check
    return env.prepare(model)


def _normalisation(
    net: nn.Module, info: DatasetInfo, role: str, data_wins: bool = False
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std to feed ``net`` with, after checking the input shape its source states against the data's."""
    meta = teacher_meta(net)
    name = meta.source or role
    checked = slice(0, 1) if data_wins else slice(None)  # the channels, or the whole shape
    if meta.input_shape is not None and tuple(meta.input_shape)[checked] != tuple(info.image_shape)[checked]:
        want, have = "x".join(map(str, meta.input_shape)), "x".join(map(str, info.image_shape))
        raise ConfigError(
            f"the {role} {name} expects {want} images but dataset {info.name} has {have}: use a dataset of that size, "
            f"or data.name=none with data.image_shape=[{', '.join(map(str, meta.input_shape))}]"
        )
    if meta.mean is None or meta.std is None:
        if meta.source:
            log.info("%s %s: normalising with dataset %s's mean/std (its source states none)", role, name, info.name)
        return info.mean, info.std
    if len(meta.mean) != info.image_shape[0]:
        raise ConfigError(
            f"the {role} {name} normalises {len(meta.mean)} channels but dataset {info.name} has "
            f"{info.image_shape[0]}: use a dataset with {len(meta.mean)}-channel images"
        )
    if data_wins and (meta.mean, meta.std) != (info.mean, info.std):
        log.info("%s %s: normalising with the run's mean %s / std %s, not its own", role, name, info.mean, info.std)
        return info.mean, info.std
    log.info("%s %s: normalising with its own mean %s / std %s", role, name, meta.mean, meta.std)
    return meta.mean, meta.std


def _check_output(model: nn.Module, info: DatasetInfo, env: Env, role: str) -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(2, *info.image_shape, device=env.device))
    model.train(was_training)
    if out.dim() != 2 or out.shape[1] != info.num_classes:
        raise ConfigError(
            f"the {role} outputs {tuple(out.shape[1:])} per image but dataset {info.name} has {info.num_classes} "
            "classes: use a network built for this dataset"
        )


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_split_on_device(info: DatasetInfo, split: str, root: str | None, env: Env, val_size: int = 0) -> tuple:
    """``split`` is train, test or val; with ``val_size`` > 0, train leaves out the validation slice."""
    images, labels = load_split(info.name, split, root, val_size)
    return images.to(env.device), labels.to(env.device)


def default_out(kind: str, name: str) -> Path:
    return Path("runs") / kind / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def progress_bar(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    """tqdm with ETA; on a terminal only (``disable=None``), and never on ranks other than 0."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=None if enabled else True,
        leave=False,
        mininterval=0.5,
    )


def tensor_bytes(obj: object) -> int:
    """Bytes held by the tensors in ``obj`` (a tensor, or dicts/lists/tuples of them, e.g. a state dict)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
