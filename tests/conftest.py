"""Shared test fixtures: tiny data on disk in the real formats, and CPU-only settings."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_configure(config):
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_dfkd_data_env(monkeypatch):
    """Tests never see a user's DFKD_DATA."""
    monkeypatch.delenv("DFKD_DATA", raising=False)


def fixture_path(name: str) -> Path:
    """The shared fixtures ship with the repository under tests/fixtures (a copy of ../shared/fixtures)."""
    return FIXTURES / name


@pytest.fixture(scope="session")
def reference_values() -> dict:
    return json.loads(fixture_path("cudfkd-reference-values.json").read_text())


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


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Fashion-MNIST-format IDX files of a small learnable problem."""
    return make_fashion_like(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def teacher_run(data_root, tmp_path_factory) -> Path:
    """A BN-LeNet-5 teacher trained for 2 epochs on the small problem (a run directory)."""
    from dfkd import load_config, train_teacher

    out = tmp_path_factory.mktemp("runs") / "teacher"
    cfg = load_config(
        "train-teacher",
        "teachers/fashion-mnist-32-lenet5_bn",
        [f"data.root={data_root}", f"out={out}", "train.epochs=2", "train.batch_size=64", "engine.progress=false"],
    )
    summary = train_teacher(cfg)
    assert summary["top1_best"] > 50.0  # learnable problem: well above chance
    return out
