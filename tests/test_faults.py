"""Faults from outside: a kill during a checkpoint write, a full disk, damaged or truncated files, a read-only run
folder. Each ends in a one-line error (never a traceback) and leaves the earlier results as they were."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import TINY_DISTILL, assert_one_line_error
from helpers import run_cli as run

import dfkd
from dfkd.engine.rundir import load_state
from dfkd.errors import CheckpointError
from dfkd.models.exported import sha256_file

DEMO = "fashion-mnist/cudfkd-lenet5_bn-lenet5_half"


def overrides(data_root: Path, teacher: Path, out: Path) -> list[str]:
    return [f"data.root={data_root}", f"teacher.weights={teacher}", f"out={out}", *TINY_DISTILL, "train.epochs=2",
            "engine.sample_every=0", "engine.stop_on_collapse=false"]  # fmt: skip


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """An untrained BN-LeNet-5 (no teacher training needed: the faults do not care what the student learns)."""
    path = tmp_path_factory.mktemp("faults") / "teacher.pt"
    torch.manual_seed(0)
    torch.save({"state_dict": dfkd.create_model("lenet5_bn", 10, 1).state_dict(), "arch": "lenet5_bn"}, path)
    return path


@pytest.fixture(scope="module")
def finished(data_root, teacher, tmp_path_factory) -> Path:
    """A finished two-epoch run with an export; tests damage copies of it."""
    out = tmp_path_factory.mktemp("faults") / "run"
    dfkd.distill(dfkd.load_config("distill", DEMO, overrides(data_root, teacher, out)))
    dfkd.export_student(out)
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp"))


class FullDisk:
    """An open file on a disk with ``room`` bytes left: the write that passes it fails with ENOSPC."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def patch_writes(monkeypatch, opened: Callable[[Path, object], object]) -> None:
    """Route every open for writing through ``opened(path, file)`` (which may raise, or wrap the file)."""
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        writing = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
        if writing:
            return opened(Path(file), lambda: real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def fill_disk_at(monkeypatch, name: str, skip: int = 0, room: int = 100) -> None:
    """The disk fills up while ``name``'s temporary file is written, after ``skip`` writes of it that fit."""
    seen = []

    def opened(path: Path, open_file):
        if path.name == f"{name}.tmp":
            seen.append(path)
            if len(seen) > skip:
                return FullDisk(open_file(), room)
        return open_file()

    patch_writes(monkeypatch, opened)


def make_read_only(monkeypatch, folder: Path) -> None:
    """``folder`` and everything in it read-only, for root too (root writes through permission bits: its writes
    there are refused as the kernel refuses anyone else's)."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    if os.geteuid() == 0:

        def opened(path: Path, open_file):
            if path.resolve().is_relative_to(folder.resolve()):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return open_file()

        patch_writes(monkeypatch, opened)


@pytest.fixture
def writable_again():
    """Give the folders a test made read-only their write permission back, so that pytest can delete them."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


# -- a kill while a checkpoint is written -------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import io, os, sys, time
    from pathlib import Path

    import torch

    import dfkd

    marker, *overrides = sys.argv[1:]
    real_save = torch.save

    def save_then_hang(obj, f, *args, **kwargs):
        # epoch 2's checkpoint: half of it reaches the disk, then the process hangs until it is killed
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            out.flush()
            Path(marker).touch()
            time.sleep(600)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save_then_hang
    dfkd.distill(dfkd.load_config("distill", "{demo}", overrides))
    """
).format(demo=DEMO)


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint(capsys, data_root, teacher, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "writing"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(marker), *overrides(data_root, teacher, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the run never reached epoch 2's checkpoint: {child.poll()}"
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, err[-2000:]
    assert load_state(out / "ckpt" / "last.pt")["epoch"] == 1  # the half-written epoch 2 never replaced it
    assert [r["epoch"] for r in rows(out)] == [1]
    code, _, err = run(capsys, "distill", "--resume", out)
    assert code == 0, err
    assert [r["epoch"] for r in rows(out)] == [1, 2] and load_state(out / "ckpt" / "last.pt")["epoch"] == 2
    assert leftovers(out) == []


# -- a full disk ----------------------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_last_one(
    capsys, monkeypatch, data_root, teacher, tmp_path
):
    out = tmp_path / "run"
    fill_disk_at(monkeypatch, "last.pt", skip=1)  # epoch 1's checkpoint fits, epoch 2's does not
    code, _, err = run(capsys, "distill", "--config", DEMO, *overrides(data_root, teacher, out))
    assert_one_line_error(code, err, f"cannot write {out / 'ckpt' / 'last.pt'}: No space left on device")
    assert f"{out / 'ckpt' / 'last.pt'} is intact: --resume {out} continues from it" in err
    assert load_state(out / "ckpt" / "last.pt")["epoch"] == 1 and [r["epoch"] for r in rows(out)] == [1]
    assert leftovers(out) == []
    monkeypatch.undo()  # space freed: the run continues where it stopped
    code, _, err = run(capsys, "distill", "--resume", out)
    assert code == 0, err
    assert [r["epoch"] for r in rows(out)] == [1, 2]


@pytest.mark.parametrize(
    "full, options",
    [
        ("student.safetensors", ["--which", "last"]),
        # the new weights are written whole, then the card fails: they must not replace the earlier export alone
        ("card.json", ["--format", "torchscript"]),
    ],
    ids=["weights", "card"],
)
def test_a_full_disk_while_exporting_keeps_the_earlier_export(capsys, monkeypatch, run_copy, full, options):
    export = run_copy / "export"
    before = {path.name: path.read_bytes() for path in export.iterdir()}
    fill_disk_at(monkeypatch, full)
    code, _, err = run(capsys, "export", run_copy, *options, "--overwrite")
    assert_one_line_error(code, err, f"cannot write {export / full}: No space left on device")
    assert f"the earlier export in {export} is intact" in err
    assert {path.name: path.read_bytes() for path in export.iterdir()} == before and leftovers(export) == []
    monkeypatch.undo()
    assert dfkd.load_student(export).card == json.loads(before["card.json"])  # the earlier export still loads


# -- damaged files --------------------------------------------------------------------------------------------------


def test_a_truncated_last_checkpoint_on_resume_names_the_file_and_the_fallback(capsys, run_copy):
    last, best = run_copy / "ckpt" / "last.pt", run_copy / "ckpt" / "best.pt"
    best_epoch = json.loads((run_copy / "summary.json").read_text())["best_epoch"]
    data = last.read_bytes()
    last.unlink()  # a new file: best.pt, a hard link of an earlier last.pt, keeps its own content
    last.write_bytes(data[: len(data) // 3])
    code, _, err = run(capsys, "distill", "--resume", run_copy)
    assert_one_line_error(code, err, f"cannot read checkpoint {last}")
    assert "damaged or incomplete" in err and f"{best} (epoch {best_epoch}) reads: copy it to {last}" in err
    best.write_bytes(b"")  # no fallback either
    code, _, err = run(capsys, "distill", "--resume", run_copy)
    assert_one_line_error(code, err, f"cannot read checkpoint {last}")
    assert "start the run again with --overwrite" in err and f"{best} (epoch" not in err


def test_a_corrupted_safetensors_export_is_refused_in_one_line(capsys, run_copy):
    weights, card_path = run_copy / "export" / "student.safetensors", run_copy / "export" / "card.json"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the tensors
    weights.write_bytes(bytes(data))
    code, _, err = run(capsys, "eval", "--weights", run_copy / "export")
    assert_one_line_error(code, err, f"{weights} does not match its card")
    # the card changed with it (re-hashed by hand), the file is not safetensors at all
    weights.write_bytes(b"not a safetensors file")
    card = json.loads(card_path.read_text())
    card["weights"]["sha256"] = sha256_file(weights)
    card_path.write_text(json.dumps(card))
    code, _, err = run(capsys, "eval", "--weights", run_copy / "export")
    assert_one_line_error(code, err, f"cannot read {weights}")
    with pytest.raises(CheckpointError, match="the file is damaged; export the run again"):
        dfkd.load_student(run_copy / "export")


def test_a_summary_that_is_not_json_is_one_line(capsys, run_copy):
    (run_copy / "summary.json").write_text('{"method": "cudfkd", "student_top1_best": 8')  # cut off mid-write
    code, _, err = run(capsys, "export", run_copy, "--out", run_copy / "again")
    assert_one_line_error(code, err, f"cannot read {run_copy / 'summary.json'}")
    assert "delete it to treat the run as unfinished" in err and not (run_copy / "again").exists()


# -- a read-only run folder -----------------------------------------------------------------------------------------


def test_a_read_only_run_folder_is_one_line_and_left_as_it_was(capsys, monkeypatch, writable_again, run_copy):
    before = {p: p.read_bytes() for p in (run_copy / "ckpt" / "last.pt", run_copy / "metrics.jsonl")}
    (run_copy / "summary.json").unlink()  # an interrupted run, to resume
    writable_again.append(run_copy)
    make_read_only(monkeypatch, run_copy)
    code, _, err = run(capsys, "distill", "--resume", run_copy)
    assert_one_line_error(code, err, "Permission denied")
    assert f"cannot write {run_copy}" in err and f"make {run_copy}" in err
    code, _, err = run(capsys, "export", run_copy, "--which", "last", "--overwrite")
    assert_one_line_error(code, err, "Permission denied")
    assert f"cannot write {run_copy / 'export'}" in err
    assert {p: p.read_bytes() for p in before} == before


def test_plot_into_a_read_only_run_folder_is_one_line(capsys, monkeypatch, writable_again, run_copy):
    pytest.importorskip("sklearn", reason="the plot extra (scikit-learn) is not installed")
    writable_again.append(run_copy)
    make_read_only(monkeypatch, run_copy)
    code, _, err = run(capsys, "plot", run_copy, "--real", 0, "--synthetic", 16)
    assert_one_line_error(code, err, "Permission denied")
    assert f"cannot write {run_copy / 'plots'}" in err
