"""Helpers shared by the tests: tiny data in the real file formats, tiny run settings."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from torch import nn


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when the name ends in .gz."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def make_fashion_like(root: Path, n_train: int = 512, n_test: int = 256, seed: int = 0) -> Path:
    """A learnable 10-class problem written as Fashion-MNIST IDX files: each class is a bright block at its own place.

    Small enough for seconds-long end-to-end runs, structured enough that a LeNet learns it well above chance.
    """
    rng = np.random.default_rng(seed)
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            r, c = divmod(int(y), 5)
            images[i, 4 + r * 10 : 4 + r * 10 + 8, 1 + c * 5 : 1 + c * 5 + 5] = 220
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


def save_png(path: Path, array) -> None:
    """An 8-bit PNG of ``array`` (H x W grey or H x W x 3) at ``path``, its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


TINY_DISTILL = [
    "method.nz=16",
    "method.ngf=4",
    "train.batch_size=32",
    "train.rounds_per_epoch=2",
    "train.kd_steps=2",
    "eval.window_start=0",
    "engine.progress=false",
    "engine.device=cpu",
]


def tiny_bench_args(teacher_run: Path, out: Path, data_root: Path, *extra: str) -> list[str]:
    """`dfkd bench fashion-mnist` on CuDFKD alone, with an existing teacher, tiny sizes and the small problem."""
    return [
        "bench",
        "fashion-mnist",
        "--methods",
        "cudfkd",
        "--teacher",
        str(teacher_run),
        "--out",
        str(out),
        f"data.root={data_root}",
        *TINY_DISTILL,
        *extra,
    ]


class NaNAfter(nn.Module):
    """A teacher that goes bad after ``calls`` forwards (to test divergence handling deterministically)."""

    def __init__(self, net: nn.Module, calls: int):
        super().__init__()
        self.net, self.calls = net, calls

    def forward(self, x):
        self.calls -= 1
        out = self.net(x)
        return out * float("nan") if self.calls < 0 else out


@contextmanager
def interrupted_after(epoch: int) -> Iterator[None]:
    """Inside the block, a run stops with KeyboardInterrupt right after writing epoch ``epoch`` (as a Ctrl-C would)."""
    from dfkd.engine import rundir

    original = rundir.RunDir.append_metrics

    def append_then_stop(self, row):
        original(self, row)
        if row["epoch"] == epoch:
            raise KeyboardInterrupt

    rundir.RunDir.append_metrics = append_then_stop
    try:
        yield
    finally:
        rundir.RunDir.append_metrics = original


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``dfkd ARGV`` in this process: its exit status, stdout and stderr."""
    from dfkd.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    """Bad input: exit status 2 and exactly one ``dfkd: error:`` line that says ``fragment``, no traceback."""
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("dfkd: error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
