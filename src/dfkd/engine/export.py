"""A student to ship: a distillation run's student as one weights file plus a JSON card.

:func:`export_student` reads a run's checkpoint and writes the export folder that
:func:`dfkd.models.exported.load_student` reads back (its layout is described there). The TorchScript and ONNX files
hold the network with its normalisation inside, so they take [0, 1] images like every model in dfkd.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shlex
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd._version import __version__
from dfkd.config import read_yaml
from dfkd.data import DATASETS, dataset_info
from dfkd.data.datafree import NO_DATA
from dfkd.engine.distill import CHECKPOINT_FORMAT
from dfkd.engine.rundir import RunDir, load_state, read_summary, write_atomically
from dfkd.errors import FAILED_STATUSES, STATUS_OK, CheckpointError, ConfigError, DfkdError, writing_to
from dfkd.methods.heldout import HELDOUT_SPLIT
from dfkd.models.exported import CARD_FORMAT, CARD_NAME, WEIGHTS_NAMES, student_module

log = logging.getLogger("dfkd")

FORMATS = tuple(WEIGHTS_NAMES)
INPUT_NOTE = {
    "safetensors": "the bare network's weights: it expects normalised images ((x - mean) / std of [0, 1] images); "
    "dfkd.load_student returns it with the normalisation inside, taking [0, 1] images",
    "torchscript": "float images in [0, 1], shape (N, C, H, W); the normalisation is inside the model",
    "onnx": "input 'images': float32 images in [0, 1], shape (N, C, H, W), any N; output 'logits'; the normalisation "
    "is inside the model",
}
DATA_KEYS = ("num_classes", "image_shape", "mean", "std")
UNFINISHED = "unfinished (no summary.json)"
# where a best epoch can be chosen without the test set having picked it
SPLITS_NOT_TEST = ("val", HELDOUT_SPLIT)


def export_student(
    run_dir: str | os.PathLike[str],
    format: str = "safetensors",
    which: str | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    force: bool = False,
) -> dict:
    """Write the student of a finished (or interrupted) ``dfkd distill`` run as a weights file plus ``card.json``.

    Args:
        run_dir: the run directory (it holds ``config.yaml`` and ``ckpt/``).
        format: ``"safetensors"`` (the bare network's state dict), ``"torchscript"`` or ``"onnx"`` (the network with
            its normalisation inside, taking [0, 1] images; ONNX needs ``pip install 'dfkd[onnx]'``).
        which: ``"best"`` (the checkpoint the run chose on its evaluation split) or ``"last"`` (the final epoch);
            default (None): ``"last"``, or ``"best"`` when the run chose it off the test set (on the validation slice,
            or by agreement on held-out synthetic images without data). The card says which, and why.
        out: the export folder; default ``run_dir/export``.
        overwrite: replace an export already in ``out``.
        force: export the student of a run that collapsed or diverged (the card records the status).

    Returns:
        The card (also written to ``out/card.json``), with ``path`` added: where the card is.

    Raises:
        CheckpointError: the run has no such checkpoint, or it is not a distillation checkpoint.
        ConfigError: unknown format or checkpoint; the run's dataset is unknown and its config does not give the
            class count, image shape and mean/std.
        DfkdError: ``out`` already holds an export (pass ``overwrite``); ONNX without the onnx package; the run
            collapsed or diverged (pass ``force``).

    Example:
        >>> card = dfkd.export_student("runs/cudfkd", format="safetensors")
        >>> student = dfkd.load_student(card["path"])
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format '{format}': use one of {', '.join(FORMATS)}")
    if which not in (None, "best", "last"):
        raise ConfigError(f"--which {which}: use 'best' or 'last'")
    run = RunDir(run_dir)
    if not run.last.is_file():
        raise CheckpointError(f"{run.path} holds no ckpt/last.pt: give the run directory of `dfkd distill`")
    if not (run.path / "config.yaml").is_file():
        raise CheckpointError(f"{run.path} holds no config.yaml: give the run directory of `dfkd distill`")
    cfg = read_yaml(run.path / "config.yaml")
    summary = read_summary(run.path) or {}
    status = summary.get("status", STATUS_OK) if summary else UNFINISHED
    if status in FAILED_STATUSES and not force:
        raise DfkdError(
            f"{run.path} is a {status} run ({summary.get('status_reason')}): its student is not a result; pass "
            "--force to export it anyway (the card records the status)"
        )
    # an interrupted run has no summary: its config says where it was scored
    split = summary.get("eval_split") or _run_split(cfg)
    chosen = which or ("best" if split in SPLITS_NOT_TEST and run.best.is_file() else "last")
    ckpt_path = run.best if chosen == "best" else run.last
    if not ckpt_path.is_file():
        raise CheckpointError(f"{run.path} has no ckpt/best.pt (no scored epoch yet): use --which last")
    out_dir = Path(out).expanduser() if out is not None else run.path / "export"
    _check_out(out_dir, overwrite)
    if format == "onnx":
        _require_onnx()

    ckpt = load_state(ckpt_path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{ckpt_path} is not a distillation checkpoint ({ckpt.get('format')}): export takes a `dfkd distill` run"
        )
    facts = _data_facts(cfg.get("data") or {}, ckpt, run.path)
    arch = str(ckpt.get("arch") or (cfg.get("student") or {}).get("arch"))
    state = ckpt["state_dict"]

    weights_path = out_dir / WEIGHTS_NAMES[format]
    weights = _weights_bytes(format, arch, state, facts)  # a student is small: whole in memory, written in one go

    epoch = int(ckpt["epoch"])
    row = next((r for r in ckpt.get("history", []) if r.get("epoch") == epoch), {})
    accuracy: dict[str, Any] = {"split": split, "epoch": epoch}
    accuracy.update({k[len("eval/") :]: v for k, v in row.items() if k.startswith("eval/") and v is not None})
    if summary.get("teacher_top1") is not None:
        accuracy["teacher_top1"] = summary["teacher_top1"]
    teacher = cfg.get("teacher") or {}
    options = {"run_dir": str(run.path), "format": format, "which": chosen, "out": str(out_dir)}
    card = {
        "format": CARD_FORMAT,
        "architecture": arch,
        "num_classes": facts["num_classes"],
        "class_names": facts["class_names"],
        "mean": facts["mean"],
        "std": facts["std"],
        "input_shape": facts["image_shape"],
        "input": INPUT_NOTE[format],
        "teacher": {"arch": teacher.get("arch"), "weights": teacher.get("weights"), "name": summary.get("teacher")},
        "method": summary.get("method") or (cfg.get("method") or {}).get("name"),
        "dataset": facts["dataset"],
        "checkpoint": chosen,
        "selected_by": _selected_by(chosen, split, summary.get("selected_by") or ckpt.get("selected_by"), epoch,
                                    summary.get("epochs"), defaulted=which is None),  # fmt: skip
        "accuracy": accuracy,
        "run_status": status,
        "run_status_reason": summary.get("status_reason"),
        "weights": {
            "file": weights_path.name,
            "format": format,
            "sha256": hashlib.sha256(weights).hexdigest(),
            "bytes": len(weights),
        },
        "dfkd_version": __version__,
        "torch_version": torch.__version__,
        "export": {**options, "command": _command(options, overwrite)},
    }
    failure = _failure_warning(status, summary.get("status_reason"))
    if failure:
        log.warning("%s: %s", run.path, failure)
    warning = failure or _optimism_warning(chosen, split)
    if warning:
        card["warning"] = warning
    card_path = out_dir / CARD_NAME
    kept = f"the earlier export in {out_dir} is intact" if (out_dir / CARD_NAME).exists() else ""
    with writing_to(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    # the weights and the card replace the earlier ones together, once both are written whole
    write_atomically({weights_path: weights, card_path: (json.dumps(card, indent=2) + "\n").encode()}, kept)
    if overwrite:  # the earlier export's weights in another format go only now that the new export is in place
        with writing_to(out_dir):
            for name in WEIGHTS_NAMES.values():
                if name != weights_path.name:
                    (out_dir / name).unlink(missing_ok=True)
    log.info("exported %s (%s, checkpoint %s, epoch %d) to %s", arch, format, chosen, epoch, weights_path)
    return {**card, "path": str(card_path)}


def _check_out(out_dir: Path, overwrite: bool) -> None:
    present = [name for name in (CARD_NAME, *WEIGHTS_NAMES.values()) if (out_dir / name).exists()]
    if present and not overwrite:
        raise DfkdError(
            f"{out_dir} already holds an export ({', '.join(present)}): pass --overwrite to replace it, or --out DIR"
        )


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise DfkdError("--format onnx needs the onnx package: pip install 'dfkd[onnx]'") from None


def _data_facts(data: dict, ckpt: dict, run: Path) -> dict:
    """Classes, image shape and normalisation of the run's data: the registry's, else the config's data section.

    A run on an unregistered data source (data.name none or folder) records them in its checkpoint (num_classes,
    image_shape, mean, std, classes), else its config.yaml states them as data.num_classes, data.image_shape,
    data.mean, data.std and data.class_names.
    """
    name = data.get("name")
    if name in DATASETS:
        info = dataset_info(name)
        facts = {
            "num_classes": info.num_classes,
            "image_shape": list(info.image_shape),
            "mean": list(info.mean),
            "std": list(info.std),
            "class_names": list(info.classes),
        }
    else:
        # the checkpoint records the facts the run resolved (config and teacher metadata together); older
        # checkpoints and hand-made configs leave them to the config's data section
        recorded = {**{key: ckpt.get(key) for key in DATA_KEYS}, "class_names": ckpt.get("classes")}
        facts = {
            key: recorded[key] if recorded[key] is not None else data.get(key) for key in (*DATA_KEYS, "class_names")
        }
        missing = [f"data.{key}" for key in DATA_KEYS if facts[key] is None]
        if missing:
            raise ConfigError(
                f"{run}/config.yaml: data.name={name} is not a registered dataset and the run records no "
                f"{', '.join(missing)}: the student's classes and input cannot be described"
            )
        try:
            facts["num_classes"] = int(facts["num_classes"])
            facts["image_shape"] = [int(v) for v in facts["image_shape"]]
            facts["mean"] = [float(v) for v in facts["mean"]]
            facts["std"] = [float(v) for v in facts["std"]]
        except (TypeError, ValueError):
            raise ConfigError(f"{run}/config.yaml: data.num_classes, image_shape, mean or std is malformed") from None
        if len(facts["image_shape"]) != 3:
            raise ConfigError(f"{run}/config.yaml: data.image_shape must be [C, H, W], got {facts['image_shape']}")
        if facts["class_names"] is not None:
            facts["class_names"] = [str(c) for c in facts["class_names"]]
    if ckpt.get("num_classes") is not None and int(ckpt["num_classes"]) != facts["num_classes"]:
        raise CheckpointError(
            f"{run}: the checkpoint has {ckpt['num_classes']} classes but its data has {facts['num_classes']}"
        )
    facts["dataset"] = name
    return facts


def _weights_bytes(format: str, arch: str, state: dict, facts: dict) -> bytes:
    """The weights file's content (written by the caller: a full disk is then an OSError, not a crash in a writer)."""
    if format == "safetensors":
        from safetensors.torch import save

        # safetensors refuses tensors that share storage; clones own theirs
        return save({k: v.detach().contiguous().clone() for k, v in state.items()}, {"arch": arch})
    model = student_module(arch, state, facts)
    example = torch.rand(2, *facts["image_shape"], generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    if format == "torchscript":
        _write_torchscript(model, example, buffer)
    else:
        _write_onnx(model, example, buffer)
    return buffer.getvalue()


def _write_torchscript(model: nn.Module, example: torch.Tensor, f: io.BytesIO) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # trace is deprecated in favour of torch.export, but its files are what C++ and mobile runtimes load; the
        # tracer's warnings about shape checks are answered by the comparison below
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example)
        other = torch.rand(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
        if not torch.allclose(traced(other), model(other), atol=1e-5, rtol=1e-4):
            raise DfkdError(f"the traced {type(model.net).__name__} differs from the network: use --format safetensors")
        torch.jit.save(traced, f)


def _write_onnx(model: nn.Module, example: torch.Tensor, f: io.BytesIO) -> None:
    import onnx

    with torch.no_grad(), warnings.catch_warnings():
        # the torch.export-based exporter needs onnxscript; the TorchScript-based one needs nothing beyond onnx
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            f,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    onnx.checker.check_model(onnx.load_from_string(f.getvalue()))


def _run_split(cfg: dict) -> str:
    """Where a run is scored, from its config: held-out synthetic images without data, else ``eval.split``."""
    if (cfg.get("data") or {}).get("name") == NO_DATA:
        return HELDOUT_SPLIT
    return (cfg.get("eval") or {}).get("split") or "test"


def _selected_by(which: str, split: str, selected: str | None, epoch: int, epochs: int | None, defaulted: bool) -> str:
    if which == "last":
        why = " (the default: this run's best.pt was chosen on the test set)" if defaulted and split == "test" else ""
        return f"last: the weights of the final epoch ({epoch}), not chosen by any score{why}"
    # best.pt's own history ends at its epoch: the run's length comes from its summary
    where = f"(epoch {epoch} of {epochs})" if epochs else f"(epoch {epoch})"
    if split == "test":
        return (
            f"best: the epoch of highest top-1 on the test set {where}; its test top-1 is optimistic, since the "
            "test set chose it"
        )
    if split == "val":
        return (
            f"best: the epoch of highest top-1 on the validation slice held out of the training split {where}; "
            "the test set did not take part in the choice"
        )
    if selected:  # e.g. agreement on held-out synthetic images, for a run without data
        return f"{selected} {where}"
    return f"best: the epoch of best score on the run's evaluation split '{split}' {where}"


def _failure_warning(status: str, reason: str | None) -> str | None:
    if status in FAILED_STATUSES:
        return f"the run {status} ({reason}): this student is not a result; exported with --force"
    return None


def _optimism_warning(which: str, split: str) -> str | None:
    if which == "best" and split == "test":
        return (
            "'best' was picked on the test set, so its test top-1 overstates what new images will show; "
            "export --which last, or distill with eval.split=val, for an unbiased number"
        )
    return None


def _command(options: dict, overwrite: bool) -> str:
    parts = ["dfkd", "export", options["run_dir"], "--format", options["format"], "--which", options["which"]]
    parts += ["--out", options["out"]] + (["--overwrite"] if overwrite else [])
    return shlex.join(parts)


__all__ = ["FORMATS", "export_student"]
