"""The run directory: resolved config, per-epoch metrics, summary, checkpoints and pictures.

Layout::

    RUN/config.yaml        the resolved configuration
    RUN/metrics.jsonl      one JSON object per epoch
    RUN/metrics.csv        the same rows as a table (columns: every key, in the order first seen)
    RUN/summary.json       written once, when the run completes
    RUN/ckpt/last.pt       everything needed to resume (written atomically every epoch)
    RUN/ckpt/best.pt       the same, for the epoch of best top-1 on the evaluation split (selected on it; with
                           data.name=none: of best agreement on the held-out synthetic images)
    RUN/samples/*.png      grids of synthetic samples
    RUN/accuracy.png       the accuracy curve
    RUN/log.txt            the log
    RUN/tensorboard/       event files, with log.tensorboard=true
    RUN/plots/             what `dfkd plot` draws
    RUN/export/            what `dfkd export` writes by default

Only rank 0 writes. Earlier results are never destroyed by accident: a directory holding a run is refused unless
the caller resumes it or explicitly overwrites it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dfkd.errors import CheckpointError, DfkdError

log = logging.getLogger("dfkd")

ARTIFACTS = (
    "config.yaml",
    "metrics.jsonl",
    "metrics.csv",
    "summary.json",
    "ckpt",
    "samples",
    "accuracy.png",
    "log.txt",
    "tensorboard",
    "plots",
    "export",  # `dfkd export`'s default folder: a replaced run must not keep the old run's student beside it
)


class RunDir:
    def __init__(self, path: str | Path, is_main: bool = True):
        self.path = Path(path).expanduser()
        self.is_main = is_main
        self._log_handler: logging.Handler | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.path / "ckpt"

    @property
    def last(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.ckpt_dir / "best.pt"

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").is_file()

    def check(self, resume: bool = False, overwrite: bool = False) -> None:
        """Refuse early (before any work) a directory that does not fit the requested mode; deletes nothing."""
        if resume and overwrite:
            raise DfkdError("--resume and --overwrite contradict each other: pick one")
        if resume:
            if not self.last.is_file():
                raise DfkdError(f"nothing to resume in {self.path}: it holds no ckpt/last.pt")
        elif not overwrite and self._present():
            state = "a finished run" if self.finished else "an unfinished run"
            hint = "--resume to continue it" if self.last.is_file() else "another out=DIR"
            raise DfkdError(
                f"{self.path} already holds {state}: pass {hint}, or --overwrite to replace it (its files will be "
                "deleted)"
            )

    def _present(self) -> list[str]:
        return [name for name in ARTIFACTS if (self.path / name).exists()] if self.path.exists() else []

    def prepare(self, resume: bool = False, overwrite: bool = False) -> None:
        """Create the directory; with ``overwrite`` first delete the artifacts of the run it holds."""
        if self.is_main:
            self.check(resume, overwrite)  # only rank 0: the others checked before rank 0 began writing
            if overwrite:
                for name in self._present():
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.path / "samples").mkdir(exist_ok=True)
            self._attach_log()

    def _attach_log(self) -> None:
        handler = logging.FileHandler(self.path / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("dfkd").addHandler(handler)
        self._log_handler = handler

    def close(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("dfkd").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    # -- files ---------------------------------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        if self.is_main:
            _atomic_write_bytes(self.path / name, text.encode())

    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl from the full history (so a resumed run never keeps lines of lost epochs)."""
        if self.is_main:
            text = "".join(json.dumps(_jsonable(row)) + "\n" for row in history)
            _atomic_write_bytes(self.path / "metrics.jsonl", text.encode())
            self._write_csv()

    def append_metrics(self, row: dict) -> None:
        if self.is_main:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(_jsonable(row)) + "\n")
            self._write_csv()

    def _write_csv(self) -> None:
        """Rewrite metrics.csv from metrics.jsonl, whole: a row may bring a new column (an epoch's first logged
        term), and a resumed run drops the rows of lost epochs from both files."""
        lines = (self.path / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
        _atomic_write_bytes(self.path / "metrics.csv", out.getvalue().encode())

    def write_summary(self, summary: dict) -> None:
        if self.is_main:
            _atomic_write_bytes(self.path / "summary.json", (json.dumps(_jsonable(summary), indent=2) + "\n").encode())

    def save_checkpoint(self, state: dict, is_best: bool) -> None:
        """Atomically write ckpt/last.pt; hard-link it as ckpt/best.pt when this epoch is the best so far."""
        if not self.is_main:
            return
        tmp = self.last.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.last)
        if is_best:
            best_tmp = self.best.with_suffix(".pt.tmp")
            best_tmp.unlink(missing_ok=True)
            try:
                os.link(self.last, best_tmp)  # last.pt is never modified in place, so sharing the inode is safe
            except OSError:
                shutil.copyfile(self.last, best_tmp)
            os.replace(best_tmp, self.best)

    def load_checkpoint(self, which: str = "last") -> dict:
        path = self.last if which == "last" else self.best
        return load_state(path)


def check_run_dirs_free(paths: Iterable[Path], overwrite: bool) -> None:
    """For a command that fills several run directories: refuse, before the first run starts, directories that hold
    a run unless ``overwrite`` (then each run replaces its own); deletes nothing."""
    taken = [Path(p) for p in paths if RunDir(p)._present()]
    if taken and not overwrite:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise DfkdError(
            f"{taken[0]}{more} already holds a run: pass --overwrite to replace it (its files will be deleted), or "
            "--out DIR"
        )


def load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}; is the file complete?") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a dfkd run checkpoint (no 'format' entry)")
    return state


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()  # as in metrics.jsonl
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if torch.is_tensor(obj):
        return _jsonable(obj.tolist())
    return obj
