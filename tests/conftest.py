"""Shared test fixtures: tiny data on disk in the real formats, and CPU-only settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_fashion_like

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_configure(config):
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def _empty_user_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xdg-data")


@pytest.fixture(autouse=True)
def _no_dfkd_data_env(monkeypatch, _empty_user_data):
    """Tests never see a user's DFKD_DATA, download mirror or the datasets `dfkd data get` put in their home."""
    monkeypatch.delenv("DFKD_DATA", raising=False)
    monkeypatch.delenv("DFKD_DATA_MIRROR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(_empty_user_data))


def fixture_path(name: str) -> Path:
    """A data file under tests/fixtures; each file's "about" field says what public code it was computed from."""
    return FIXTURES / name


@pytest.fixture(scope="session")
def reference_values() -> dict:
    return json.loads(fixture_path("cudfkd-reference-values.json").read_text())


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
        [
            f"data.root={data_root}",
            f"out={out}",
            "train.epochs=2",
            "train.batch_size=64",
            "engine.progress=false",
            "data.val_size=64",  # the recipe's 5,000 is more than the small problem has
        ],
    )
    summary = train_teacher(cfg)
    assert summary["top1_best"] > 50.0  # learnable problem: well above chance
    return out
