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

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dfkd.errors import CheckpointError, DfkdError, write_error

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
        if not self.is_main:
            return
        self.check(resume, overwrite)  # only rank 0: the others checked before rank 0 began writing
        try:
            if overwrite:
                for name in self._present():
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.path / "samples").mkdir(exist_ok=True)
            self._attach_log()
        except OSError as exc:
            raise write_error(exc.filename or self.path, exc) from None

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
            write_atomically({self.path / name: text.encode()})

    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl from the full history (so a resumed run never keeps lines of lost epochs)."""
        if self.is_main:
            text = "".join(json.dumps(_jsonable(row)) + "\n" for row in history)
            write_atomically({self.path / "metrics.jsonl": text.encode()})
            self._write_csv()

    def append_metrics(self, row: dict) -> None:
        if self.is_main:
            path = self.path / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(_jsonable(row)) + "\n")
            except OSError as exc:
                raise write_error(path, exc, self._kept()) from None
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
        write_atomically({self.path / "metrics.csv": out.getvalue().encode()}, self._kept())

    def write_summary(self, summary: dict) -> None:
        if self.is_main:
            text = json.dumps(_jsonable(summary), indent=2) + "\n"
            write_atomically({self.path / "summary.json": text.encode()}, self._kept())

    def save_checkpoint(self, state: dict, is_best: bool) -> None:
        """Atomically write ckpt/last.pt; hard-link it as ckpt/best.pt when this epoch is the best so far."""
        if not self.is_main:
            return
        write_atomically({self.last: torch_writer(state)}, self._kept())
        if is_best:
            best_tmp = self.best.with_suffix(".pt.tmp")
            try:
                best_tmp.unlink(missing_ok=True)
                try:
                    os.link(self.last, best_tmp)  # last.pt is never modified in place, so sharing the inode is safe
                except OSError:
                    shutil.copyfile(self.last, best_tmp)
                os.replace(best_tmp, self.best)
            except OSError as exc:
                raise write_error(self.best, exc, f"{self.last} holds this epoch") from None

    def _kept(self) -> str:
        """What a failed write leaves for the user: the last checkpoint, which --resume continues from."""
        return f"{self.last} is intact: --resume {self.path} continues from it" if self.last.is_file() else ""

    def load_checkpoint(self, which: str = "last") -> dict:
        """A checkpoint of the run; a damaged last.pt names best.pt as the fallback where best.pt still reads."""
        path = self.last if which == "last" else self.best
        try:
            return load_state(path)
        except CheckpointError as exc:
            if which != "last":
                raise
            raise CheckpointError(f"{exc}; {self._fallback()}") from None

    def _fallback(self) -> str:
        if self.best.is_file() and not _same_file(self.best, self.last):
            try:
                epoch = load_state(self.best).get("epoch")
            except CheckpointError:
                pass
            else:
                return (
                    f"{self.best} (epoch {epoch}) reads: copy it to {self.last} to resume from that epoch, or start "
                    "again with --overwrite"
                )
        return "start the run again with --overwrite"


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
        why = (str(exc).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {why}): it is damaged or incomplete"
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a dfkd run checkpoint (no 'format' entry)")
    return state


def read_summary(path: Path) -> dict | None:
    """A run's summary.json (None where the run has none yet); a damaged one is a one-line error."""
    file = Path(path) / "summary.json"
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DfkdError(
            f"cannot read {file} ({exc}): the run's summary is damaged; delete it to treat the run as unfinished, "
            "or run it again"
        ) from None
    if not isinstance(summary, dict):
        raise DfkdError(f"{file} holds no summary (a JSON object): delete it to treat the run as unfinished")
    return summary


def scored_by(summaries: list[dict]) -> tuple[str, str]:
    """What a suite's runs are compared by: (summary key prefix, name). Top-1 on labelled data; agreement with the
    teacher on held-out synthetic images for runs without data (``data.name=none``)."""
    if summaries and all(s.get("curve_metric") == "eval/agreement" for s in summaries):
        return "agreement", "agreement"
    return "student_top1", "top-1"


Content = bytes | Callable[[BinaryIO], None]


def write_atomically(files: dict[Path, Content], kept: str = "") -> None:
    """Write every file whole or not at all: each into ``NAME.tmp`` beside it (flushed to disk), then all renamed over
    their targets, so that a kill, a crash or a full disk leaves the earlier files as they were.

    Args:
        files: path -> its bytes, or a function writing them to an open binary file (for large files).
        kept: what a failed write leaves intact, for the error message.

    Raises:
        DfkdError: a file could not be written (a full disk, a read-only folder), in one line naming it.
    """
    staged: list[Path] = []
    path = next(iter(files), Path())
    try:
        for path, content in files.items():
            tmp = path.with_name(path.name + ".tmp")
            staged.append(tmp)
            with open(tmp, "wb") as f:
                if isinstance(content, bytes):
                    f.write(content)
                else:
                    content(f)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in zip(files, staged):
            os.replace(tmp, path)
    except OSError as exc:
        for tmp in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise write_error(path, exc, kept) from None


def torch_writer(obj: Any) -> Callable[[BinaryIO], None]:
    """A :func:`write_atomically` content that ``torch.save``s ``obj``. torch reports a failed write (a full disk) as a
    RuntimeError of its zip writer without the reason; the file's own OSError is raised instead."""

    def write(f: BinaryIO) -> None:
        sink = _WriteRecorder(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise

    return write


class _WriteRecorder:
    """A file for ``torch.save`` that keeps the OSError of a failed write."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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
