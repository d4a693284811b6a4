"""Helpers shared by the tests: tiny data in the real file formats, tiny run settings."""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from torch import nn

from dfkd.data import dataset_info


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


def cifar_batch(rng, n, label_key, num_classes, learnable=False):
    """One pickled CIFAR batch of random images; ``learnable``: each class brightens its own band of the red plane."""
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    if learnable:
        planes = data.reshape(n, 3, 32, 32)
        planes //= 4
        for i, y in enumerate(labels):
            planes[i, 0, :, y * 32 // num_classes : y * 32 // num_classes + 3] = 230
    batch = {b"batch_label": b"batch", label_key: labels, b"data": data, b"filenames": [b"x.png"] * n}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v // 5 for v in labels]
    return batch


def write_cifar10(folder: Path, n=3, learnable=False) -> dict:
    """The CIFAR-10 python batches (n images each, n + 1 in the test batch) and batches.meta, as pickles."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": cifar_batch(rng, n, b"labels", 10, learnable) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(rng, n + 1, b"labels", 10, learnable)
    batches["batches.meta"] = {b"label_names": [name.encode() for name in dataset_info("cifar10").classes],
                               b"num_cases_per_batch": n, b"num_vis": 3072}
    for name, obj in batches.items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return batches


def write_cifar100(folder: Path, n=5, learnable=False) -> dict:
    """The CIFAR-100 python files train (n images), test (n - 1) and meta, as pickles."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    files = {"train": cifar_batch(rng, n, b"fine_labels", 100, learnable),
             "test": cifar_batch(rng, n - 1, b"fine_labels", 100, learnable),
             "meta": {b"fine_label_names": [c.encode() for c in dataset_info("cifar100").classes],
                      b"coarse_label_names": [b"c"] * 20}}
    for name, obj in files.items():
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    return files


def make_archive(folder: Path, archive: Path) -> None:
    """``folder`` as a .tar.gz whose top-level folder is its name (the layout of the official CIFAR archives)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


def make_cifar_like(root: Path, name: str = "cifar10") -> Path:
    """The official python archive of CIFAR-10 (200 training, 41 test images) or CIFAR-100 (200 / 199) in ``root``,
    holding a small learnable problem; returns the archive's path."""
    build = root / ".build"
    if name == "cifar10":
        folder, archive = build / "cifar-10-batches-py", "cifar-10-python.tar.gz"
        write_cifar10(folder, n=40, learnable=True)
    else:
        folder, archive = build / "cifar-100-python", "cifar-100-python.tar.gz"
        write_cifar100(folder, n=200, learnable=True)
    make_archive(folder, root / archive)
    shutil.rmtree(build)
    return root / archive


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


def save_png(path: Path, array) -> None:
    """Write ``array`` (H x W grey or H x W x 3 RGB, 0..255) as a PNG, making its folder."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``dfkd ARGV`` in this process: its exit status, stdout and stderr."""
    from dfkd.commands.cli import main

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
