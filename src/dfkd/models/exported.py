"""Reading back a student that `dfkd export` wrote: an export folder holds the network's weights and a JSON card.

Layout of an export folder (default ``RUN/export``)::

    OUT/student.safetensors   the bare network's state dict, keys as in the CMI zoo (or .torchscript.pt / .onnx)
    OUT/card.json             architecture, classes, mean/std, input shape, teacher, method, accuracy and how the
                              checkpoint was chosen, the weights file's sha256

The TorchScript and ONNX files hold the network with its normalisation inside, so they take [0, 1] images like every
model in dfkd; the safetensors file holds the bare network and :func:`load_student` wraps it in
:class:`~dfkd.models.Normalized` with the card's mean/std. The export itself is written by
:func:`dfkd.engine.export.export_student`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from dfkd.errors import FAILED_STATUSES, CheckpointError, ConfigError, DfkdError
from dfkd.models.meta import TeacherMeta, attach_meta
from dfkd.models.registry import create_model
from dfkd.models.weights import load_weights
from dfkd.models.wrapper import Normalized

log = logging.getLogger("dfkd")

CARD_FORMAT = "dfkd-student-card/1"
CARD_NAME = "card.json"
WEIGHTS_NAMES = {
    "safetensors": "student.safetensors",
    "torchscript": "student.torchscript.pt",
    "onnx": "student.onnx",
}


def load_student(path: str | os.PathLike[str], trust_code: bool = False) -> nn.Module:
    """A student exported by :func:`export_student`, ready to use: eval mode, on the CPU, taking [0, 1] images.

    The card's sha256 shows that the weights file is the one the card describes (not damaged, not changed on its
    own), not who made the two: a TorchScript export is a program, loaded only with ``trust_code``; a safetensors
    export holds tensors only and never needs it.

    Args:
        path: the export folder, its ``card.json``, or the weights file beside the card.
        trust_code: load a TorchScript export (its code runs); refused without it.

    Returns:
        The model, with the card as ``model.card`` (a dict) and its :class:`~dfkd.models.meta.TeacherMeta` as
        ``model.dfkd_meta``. A safetensors export comes back as a :class:`~dfkd.models.Normalized` zoo network, a
        TorchScript one as the loaded script module.

    Raises:
        CheckpointError: no card, a card of another format, a weights file missing or whose sha256 differs from
            the card's (changed or damaged after the export).
        ConfigError: a TorchScript export without ``trust_code``.
        DfkdError: an ONNX export (those are for onnxruntime and other ONNX runtimes).

    Example:
        >>> student = dfkd.load_student("runs/cudfkd/export")
        >>> student(torch.rand(8, *student.card["input_shape"])).argmax(1)
    """
    card_path = find_card(path)
    if card_path is None:
        raise CheckpointError(f"{path} is not a dfkd export: give the folder `dfkd export` wrote or its card.json")
    card = read_card(card_path)
    if card.get("run_status") in FAILED_STATUSES:
        log.warning(
            "%s holds the student of a %s run (%s): its accuracy is not a result",
            card_path,
            card["run_status"],
            card.get("run_status_reason"),
        )
    weights = card_path.parent / card["weights"]["file"]
    if not weights.is_file():
        raise CheckpointError(f"the card {card_path} names {weights.name}, which is not beside it")
    digest = sha256_file(weights)
    if digest != card["weights"]["sha256"]:
        raise CheckpointError(
            f"{weights} does not match its card (sha256 {digest[:12]}... instead of {card['weights']['sha256'][:12]}"
            "...): the file changed after the export; export the run again"
        )
    fmt = card["weights"]["format"]
    if fmt == "onnx":
        raise DfkdError(
            f"{weights} is an ONNX export: run it with onnxruntime (onnxruntime.InferenceSession(path), input "
            "'images' in [0, 1]); load_student reads safetensors and TorchScript exports"
        )
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as exc:  # its card was changed with it, or the file was damaged since
            raise CheckpointError(f"cannot read {weights} ({exc}): the file is damaged; export the run again") from None
        model = student_module(card["architecture"], tensors, _card_facts(card))
    elif fmt == "torchscript":
        if not trust_code:
            raise ConfigError(
                f"{weights} is a TorchScript export, a program that runs when loaded; its card's sha256 shows only "
                "that the file matches the card, not who made them: if you trust its author, pass trust_code=True "
                "(dfkd eval --trust-code), else ask for a safetensors export, which holds tensors only"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
            model = torch.jit.load(str(weights), map_location="cpu")
    else:
        raise CheckpointError(f"{card_path} names weights format '{fmt}', which this dfkd does not know")
    model.eval()
    model.card = card
    return attach_meta(
        model,
        TeacherMeta(
            mean=tuple(card["mean"]),
            std=tuple(card["std"]),
            input_shape=tuple(card["input_shape"]),
            num_classes=int(card["num_classes"]),
            classes=tuple(card["class_names"]) if card.get("class_names") else None,
            source=f"dfkd export {card_path}",
        ),
    )


def find_card(path: str | os.PathLike[str]) -> Path | None:
    """The card of an export given as its folder, its card or its weights file; None when ``path`` is no export."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p / CARD_NAME if (p / CARD_NAME).is_file() else None
    if p.suffix == ".json" and p.is_file():
        return p
    if p.is_file() and p.name in WEIGHTS_NAMES.values() and (p.parent / CARD_NAME).is_file():
        return p.parent / CARD_NAME
    return None


def read_card(path: Path) -> dict:
    """Read and check a card written by :func:`export_student`."""
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the export card {path}: {exc}") from None
    if not isinstance(card, dict) or not str(card.get("format", "")).startswith("dfkd-student-card/"):
        raise CheckpointError(f"{path} is not a dfkd export card (no 'format: {CARD_FORMAT}' entry)")
    if card["format"] != CARD_FORMAT:
        raise CheckpointError(f"{path} is a {card['format']} card; this dfkd reads {CARD_FORMAT}: upgrade dfkd")
    return card


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _card_facts(card: dict) -> dict:
    return {
        "num_classes": int(card["num_classes"]),
        "image_shape": [int(v) for v in card["input_shape"]],
        "mean": card["mean"],
        "std": card["std"],
    }


def student_module(arch: str, state: dict, facts: dict) -> nn.Module:
    """The zoo network ``arch`` filled with ``state`` and wrapped to take [0, 1] images with the facts' mean/std."""
    net = create_model(arch, facts["num_classes"], facts["image_shape"][0])
    load_weights(net, state, f"the student's weights ({arch})")
    return Normalized(net, facts["mean"], facts["std"]).eval()


__all__ = ["CARD_FORMAT", "CARD_NAME", "WEIGHTS_NAMES", "find_card", "load_student", "read_card", "sha256_file"]
