"""Reading weight files and fitting them to a network, with one-line errors that say what to fix.

Files are read with ``weights_only=True``, so they may only hold tensors and plain containers. Accepted layouts:
a raw state dict (torchvision, ours), a dict with the state dict under ``state_dict`` (CMI's teachers, our own
checkpoints) or under ``model`` (RepDistiller). Prefixes added by ``DataParallel``/``DistributedDataParallel``
(``module.``) and ``torch.compile`` (``_orig_mod.``) are removed.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dfkd.errors import CheckpointError
from dfkd.models.wrapper import Normalized

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_KEYS = ("state_dict", "model")
_SAVE_HINT = "it must be a state dict saved with torch.save(model.state_dict(), path)"


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _load_file(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of foreign files; the error below is the useful message.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"'{path}' holds Python objects other than tensors{what} and cannot be loaded safely; {_SAVE_HINT}"
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"'{path}' is not a PyTorch checkpoint (torch.load failed with {type(e).__name__}); {_SAVE_HINT}"
        ) from e


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a weights file into a clean state dict and its metadata.

    Args:
        path: A file written by ``torch.save``: a state dict, or a dict holding one under ``state_dict`` or
            ``model``.

    Returns:
        ``(state_dict, meta)``: the tensors with ``module.``/``_orig_mod.`` prefixes removed, and the other
        top-level entries that are plain numbers or strings (our checkpoints store ``arch``, ``num_classes``,
        ``in_channels``, ``top1`` there).

    Raises:
        CheckpointError: The file is missing, is not a torch file, holds arbitrary Python objects, or holds no
            tensors.

    Example:
        >>> import tempfile, torch
        >>> from dfkd.models import create_model, read_weights
        >>> path = tempfile.mkdtemp() + "/w.pt"
        >>> torch.save({"state_dict": create_model("tiny_cnn").state_dict(), "top1": 0.5}, path)
        >>> state, meta = read_weights(path)
        >>> meta
        {'top1': 0.5}
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"weights file '{p}' does not exist; check the path")
    if not p.is_file():
        raise CheckpointError(f"weights path '{p}' is not a file; point it at the .pt/.pth file")
    obj = _load_file(p)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{p}' holds a {type(obj).__name__}, not a dict of tensors; {_SAVE_HINT}")
    source, wrapper = obj, None
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            source, wrapper = obj[key], key
            break
    state = {_strip_prefixes(str(k)): v for k, v in source.items() if isinstance(v, Tensor)}
    if not state:
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise CheckpointError(
            f"'{p}' holds no tensors (top-level keys: {keys}); expected a state dict, or a dict with one under "
            f"'state_dict' or 'model'"
        )
    meta = {str(k): v for k, v in obj.items() if k != wrapper and isinstance(v, (bool, int, float, str))}
    return state, meta


def _inner(model: nn.Module) -> nn.Module:
    # Look through the wrappers that do not change parameter names of the saved net.
    while True:
        if isinstance(model, Normalized):
            model = model.net
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _arch_name(net: nn.Module) -> str:
    arch = getattr(net, "arch", None)
    return arch if isinstance(arch, str) else type(net).__name__


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _preview(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:3])
    return shown + (", ..." if len(keys) > 3 else "")


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear] | None:
    found = None
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            found = (name, m)
    return found


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` strictly, after checking that every key and shape fits.

    A :class:`~dfkd.models.Normalized` (or DDP / compiled) wrapper is looked through: the weights go into the inner
    net, whose keys are the ones checkpoints store. BatchNorm ``num_batches_tracked`` counters missing from old
    files are tolerated.

    Args:
        model: The network to fill.
        state_dict: Tensors by parameter name, e.g. from :func:`read_weights`.
        source: How to name the weights in error messages, e.g. ``"teacher checkpoint runs/t/best.pt"``.

    Raises:
        CheckpointError: Keys are missing or unexpected (the first three are named, with the counts), or a tensor
            has the wrong shape (the first such key is named with both shapes; a mismatch confined to the final
            classifier is reported as a class-count mismatch).
    """
    net = _inner(model)
    arch = _arch_name(net)
    own = net.state_dict()
    state = dict(state_dict)
    for key, value in own.items():
        # Checkpoints from before PyTorch 0.4.1 have no BN step counter; the model's own one is as good.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.clone()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys of the model are missing from it ({_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys in it are unknown to the model ({_preview(unexpected)})")
        raise CheckpointError(
            f"{source} does not fit {arch}: {' and '.join(parts)}; check that {arch} is the architecture it was "
            f"trained with"
        )
    mismatched = [k for k in own if state[k].shape != own[k].shape]
    if mismatched:
        first = mismatched[0]
        detail = f"key '{first}' has shape {_shape(state[first])} in the file but {_shape(own[first])} in the model"
        head = _last_linear(net)
        head_keys = {f"{head[0]}.weight", f"{head[0]}.bias"} if head else set()
        if head and set(mismatched) <= head_keys and all(state[k].shape[1:] == own[k].shape[1:] for k in mismatched):
            n_file, n_model = state[mismatched[0]].shape[0], own[mismatched[0]].shape[0]
            raise CheckpointError(
                f"{source} does not fit {arch}: the checkpoint was trained for {n_file} classes but the dataset has "
                f"{n_model} ({detail}); use a checkpoint trained on this dataset"
            )
        more = f" (and {len(mismatched) - 1} more mismatched keys)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"{source} does not fit {arch}: {detail}{more}; check the architecture, input channels and class count"
        )
    net.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s into %s", len(state), source, arch)
