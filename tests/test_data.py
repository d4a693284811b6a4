"""Dataset readers (on tiny files written in the real formats), file lookup, errors, and the in-memory loader."""

from __future__ import annotations

import fractions
import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from helpers import make_archive, write_cifar10, write_cifar100

from dfkd.data import (
    DATASETS,
    TensorLoader,
    clear_cache,
    dataset_info,
    dataset_names,
    load_dataset,
    read_idx,
    to_float,
    to_uint8,
)
from dfkd.data import datasets as ds
from dfkd.errors import ConfigError, DataError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the machine's real data unless it asks for it with an explicit root."""
    monkeypatch.setattr(ds, "DEBIAN_ROOT", str(tmp_path / "debian"))
    monkeypatch.delenv("DFKD_DATA", raising=False)
    clear_cache()
    yield
    clear_cache()


def idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[arr.dtype], arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def fake_idx_set(folder: Path, n_train=12, n_test=6, gz=True, seed=0, fill=None) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        if fill is not None:
            images[:] = fill
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[split] = (images, labels)
    return out


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    counts = torch.bincount(images.reshape(-1), minlength=256).double()
    levels = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum()
    mean = (counts * levels).sum() / n
    return float(mean), float(((counts * levels**2).sum() / n - mean**2).sqrt())


# IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    arr = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    path = write_idx(tmp_path / "a-idx3-ubyte", arr, gz)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_truncated(tmp_path, gz):
    data = idx_bytes(np.zeros((5, 4, 4), np.uint8))[:-7]
    path = tmp_path / ("t.gz" if gz else "t")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_malformed(tmp_path):
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x08\x03\x00\x00" + bytes(20))
    with pytest.raises(DataError, match="not an IDX file") as err:
        read_idx(bad_magic)
    assert str(bad_magic) in str(err.value)

    short_header = tmp_path / "short"
    short_header.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")
    with pytest.raises(DataError, match="header ends early"):
        read_idx(short_header)

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="no header"):
        read_idx(empty)

    too_long = tmp_path / "long.gz"
    too_long.write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8)) + b"\x01"))
    with pytest.raises(DataError, match="longer than"):
        read_idx(too_long)

    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))[:-20])
    with pytest.raises(DataError, match=str(broken_gz)):
        read_idx(broken_gz)

    with pytest.raises(DataError, match="missing-file"):
        read_idx(tmp_path / "missing-file")


# Fashion-MNIST / MNIST


@pytest.mark.parametrize(
    ("name", "layout", "gz"),
    [
        ("fashion-mnist", "fashion-mnist", True),
        ("fashion-mnist", "FashionMNIST/raw", False),
        ("fashion-mnist", "", True),
        ("mnist", "mnist", True),
        ("mnist", "MNIST/raw", False),
        ("mnist", "", False),
    ],
)
def test_idx_datasets_layouts(tmp_path, name, layout, gz):
    root = tmp_path / "data"
    truth = fake_idx_set(root / layout if layout else root, gz=gz)
    for split in ("train", "test"):
        images, labels = load_dataset(name, split, root=str(root))
        assert images.dtype == torch.uint8 and images.is_contiguous() and images.device.type == "cpu"
        assert labels.dtype == torch.int64
        assert images.shape == (len(truth[split][0]), 1, 28, 28)
        np.testing.assert_array_equal(images[:, 0].numpy(), truth[split][0])
        np.testing.assert_array_equal(labels.numpy(), truth[split][1])


def test_idx_dotted_file_names(tmp_path):
    folder = tmp_path / "mnist"
    images = np.full((3, 28, 28), 7, np.uint8)
    write_idx(folder / "train-images.idx3-ubyte", images, gz=False)
    write_idx(folder / "train-labels.idx1-ubyte", np.array([1, 2, 3], np.uint8), gz=False)
    x, y = load_dataset("mnist", "train", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [1, 2, 3]


def test_lookup_order(tmp_path, monkeypatch):
    explicit, env, debian = tmp_path / "explicit", tmp_path / "env", tmp_path / "debian"
    user = tmp_path / "xdg" / "dfkd" / "datasets"  # where `dfkd data get` puts files by default
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    for fill, root in ((1, explicit), (2, env), (3, debian), (4, user)):
        fake_idx_set(root / "fashion-mnist", fill=fill)
    monkeypatch.setenv("DFKD_DATA", str(env))
    assert ds.default_root() == env
    assert int(load_dataset("fashion-mnist", "train", root=explicit)[0][0, 0, 0, 0]) == 1
    assert int(load_dataset("fashion-mnist", "train")[0][0, 0, 0, 0]) == 2
    # A root without the files falls through to the next candidate.
    assert int(load_dataset("fashion-mnist", "train", root=tmp_path / "empty")[0][0, 0, 0, 0]) == 2
    monkeypatch.delenv("DFKD_DATA")
    assert ds.default_root() == user
    assert int(load_dataset("fashion-mnist", "train")[0][0, 0, 0, 0]) == 4
    assert ds.candidate_roots(explicit) == [explicit, user, debian]
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "nothing-here"))
    assert int(load_dataset("fashion-mnist", "train")[0][0, 0, 0, 0]) == 3


def test_env_var_holds_several_roots(tmp_path, monkeypatch):
    fake_idx_set(tmp_path / "second" / "mnist", fill=9)
    monkeypatch.setenv("DFKD_DATA", f"{tmp_path / 'first'}:{tmp_path / 'second'}")
    assert int(load_dataset("mnist", "test")[0].max()) == 9


def test_fashion_variants(tmp_path):
    truth = fake_idx_set(tmp_path / "fashion-mnist")
    base, labels = load_dataset("fashion-mnist", "train", root=tmp_path)
    padded, labels32 = load_dataset("fashion-mnist-32", "train", root=tmp_path)
    assert padded.shape == (12, 1, 32, 32) and padded.dtype == torch.uint8 and padded.is_contiguous()
    assert torch.equal(padded[:, :, 2:30, 2:30], base)
    border = padded.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.abs().sum()) == 0
    assert torch.equal(labels32, labels)
    x3, labels3 = load_dataset("fashion-mnist-32x3", "train", root=tmp_path)
    assert x3.shape == (12, 3, 32, 32) and x3.is_contiguous()
    for c in range(3):
        assert torch.equal(x3[:, c], padded[:, 0])
    np.testing.assert_array_equal(labels3.numpy(), truth["train"][1])


def test_mnist_32_resize(tmp_path):
    fake_idx_set(tmp_path / "mnist", n_train=4, n_test=3)
    base, _ = load_dataset("mnist", "test", root=tmp_path)
    resized, _ = load_dataset("mnist-32", "test", root=tmp_path)
    assert resized.shape == (3, 1, 32, 32) and resized.dtype == torch.uint8
    ref = F.interpolate(base.float(), size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(resized, ref.round().clamp(0, 255).to(torch.uint8))
    fake_idx_set(tmp_path / "flat" / "mnist", fill=200)
    flat, _ = load_dataset("mnist-32", "train", root=tmp_path / "flat")
    assert int(flat.min()) == int(flat.max()) == 200


def test_wrong_idx_contents(tmp_path):
    folder = tmp_path / "fashion-mnist"
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), gz=True)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=True)
    with pytest.raises(DataError, match="labels"):
        load_dataset("fashion-mnist", "train", root=tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte", np.full(4, 12, np.uint8), gz=True)
    with pytest.raises(DataError, match="outside 0..9"):
        load_dataset("fashion-mnist", "train", root=tmp_path)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((4, 20, 20), np.uint8), gz=True)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=True)
    with pytest.raises(DataError, match="shape"):
        load_dataset("fashion-mnist", "test", root=tmp_path)


def test_cache(tmp_path):
    fake_idx_set(tmp_path / "fashion-mnist", n_train=12)
    first = load_dataset("fashion-mnist", "train", root=tmp_path)
    assert load_dataset("fashion-mnist", "train", root=tmp_path)[0] is first[0]
    fake_idx_set(tmp_path / "fashion-mnist", n_train=20, seed=1)
    assert load_dataset("fashion-mnist", "train", root=tmp_path)[0].shape[0] == 20
    clear_cache()
    assert load_dataset("fashion-mnist", "train", root=tmp_path)[0].shape[0] == 20


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    root = REAL_FASHION.parent
    train_x, train_y = load_dataset("fashion-mnist", "train", root=root)
    test_x, test_y = load_dataset("fashion-mnist", "test", root=root)
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(train_y).tolist() == [6000] * 10
    assert torch.bincount(test_y).tolist() == [1000] * 10
    for name in ("fashion-mnist", "fashion-mnist-32"):
        images, _ = load_dataset(name, "train", root=root)
        mean, std = pixel_stats(images)
        info = dataset_info(name)
        assert abs(mean - info.mean[0]) < 5e-4 and abs(std - info.std[0]) < 5e-4, (name, mean, std)
    wide = dataset_info("fashion-mnist-32x3")
    assert wide.mean == dataset_info("fashion-mnist-32").mean * 3
    assert wide.std == dataset_info("fashion-mnist-32").std * 3


# digits


def test_digits_split_and_stats():
    pytest.importorskip("sklearn")
    train_x, train_y = load_dataset("digits", "train")
    test_x, test_y = load_dataset("digits", "test")
    assert train_x.shape == (1442, 1, 8, 8) and test_x.shape == (355, 1, 8, 8)
    assert int(train_x.max()) == 255 and train_x.dtype == torch.uint8
    total = torch.bincount(train_y, minlength=10) + torch.bincount(test_y, minlength=10)
    assert torch.equal(torch.bincount(test_y, minlength=10), total // 5)
    for name in ("digits", "digits-32"):
        images, _ = load_dataset(name, "train")
        mean, std = pixel_stats(images)
        info = dataset_info(name)
        assert abs(mean - info.mean[0]) < 5e-4 and abs(std - info.std[0]) < 5e-4, (name, mean, std)
    assert load_dataset("digits-32", "test")[0].shape == (355, 1, 32, 32)
    clear_cache()
    again_x, again_y = load_dataset("digits", "test")
    assert torch.equal(again_x, test_x) and torch.equal(again_y, test_y)


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        load_dataset("digits", "train")


# CIFAR


def expected_cifar(batches, names, label_key):
    x = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    y = np.concatenate([batches[n][label_key] for n in names])
    return x, y


def test_cifar10_extracted_and_archive(tmp_path):
    batches = write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    make_archive(tmp_path / "src" / "cifar-10-batches-py", tmp_path / "arc" / "cifar10" / "cifar-10-python.tar.gz")
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    for root in (tmp_path / "src", tmp_path / "arc"):
        x, y = load_dataset("cifar10", "train", root=root)
        ex, ey = expected_cifar(batches, train_names, b"labels")
        assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
        np.testing.assert_array_equal(x.numpy(), ex)
        np.testing.assert_array_equal(y.numpy(), ey)
        # Row-major RGB planes: the first 1024 values are the red channel, row by row.
        assert int(x[0, 0, 0, 1]) == batches["data_batch_1"][b"data"][0, 1]
        assert int(x[0, 1, 0, 0]) == batches["data_batch_1"][b"data"][0, 1024]
        assert int(x[0, 2, 31, 31]) == batches["data_batch_1"][b"data"][0, 3071]
        tx, ty = load_dataset("cifar10", "test", root=root)
        assert tx.shape == (4, 3, 32, 32)
        np.testing.assert_array_equal(ty.numpy(), batches["test_batch"][b"labels"])


def test_cifar100_extracted_and_archive(tmp_path):
    files = write_cifar100(tmp_path / "src" / "cifar-100-python")
    make_archive(tmp_path / "src" / "cifar-100-python", tmp_path / "arc" / "cifar-100-python.tar.gz")
    for root in (tmp_path / "src", tmp_path / "arc"):
        for split, n in (("train", 5), ("test", 4)):
            x, y = load_dataset("cifar100", split, root=root)
            ex, ey = expected_cifar(files, [split], b"fine_labels")
            assert x.shape == (n, 3, 32, 32)
            np.testing.assert_array_equal(x.numpy(), ex)
            np.testing.assert_array_equal(y.numpy(), ey)
    info = dataset_info("cifar100")
    assert len(info.classes) == 100 and list(info.classes) == sorted(info.classes)


def test_cifar_errors(tmp_path):
    folder = tmp_path / "a" / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 7}, protocol=2))
    with pytest.raises(DataError, match="7 class names"):
        load_dataset("cifar10", "train", root=tmp_path / "a")

    evil = tmp_path / "b" / "cifar-10-batches-py"
    write_cifar10(evil)
    (evil / "test_batch").write_bytes(pickle.dumps({b"data": fractions.Fraction(1, 2)}, protocol=2))
    with pytest.raises(DataError, match="refusing to load fractions.Fraction"):
        load_dataset("cifar10", "test", root=tmp_path / "b")

    wrong_shape = tmp_path / "c" / "cifar-10-batches-py"
    write_cifar10(wrong_shape)
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (wrong_shape / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match="N x 3072"):
        load_dataset("cifar10", "test", root=tmp_path / "c")

    other = tmp_path / "d" / "not-cifar"
    other.mkdir(parents=True)
    (other / "readme").write_text("hi")
    make_archive(other, tmp_path / "d" / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="no member cifar-10-batches-py/data_batch_1"):
        load_dataset("cifar10", "train", root=tmp_path / "d")

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "cifar-100-python.tar.gz").write_bytes(b"not a gzip file")
    with pytest.raises(DataError, match="cannot read the archive"):
        load_dataset("cifar100", "test", root=tmp_path / "e")


# SVHN


@pytest.mark.parametrize("sub", ["svhn", ""])
def test_svhn(tmp_path, sub):
    rng = np.random.default_rng(2)
    n = 7
    big_x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9], [5], [3]], dtype=np.uint8)
    folder = tmp_path / sub if sub else tmp_path
    folder.mkdir(exist_ok=True)
    scipy.io.savemat(folder / "test_32x32.mat", {"X": big_x, "y": y})
    x, labels = load_dataset("svhn", "test", root=tmp_path)
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert labels.tolist() == [0, 1, 2, 0, 9, 5, 3]
    assert int(x[4, 2, 5, 17]) == big_x[5, 17, 2, 4]
    np.testing.assert_array_equal(x.numpy(), big_x.transpose(3, 2, 0, 1))


def test_svhn_malformed(tmp_path):
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "train_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": [[1], [2]]})
    with pytest.raises(DataError, match=r"X \[32, 32, 3, N\]"):
        load_dataset("svhn", "train", root=tmp_path)
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"garbage" * 20)
    with pytest.raises(DataError, match="cannot read the .mat file"):
        load_dataset("svhn", "test", root=tmp_path)


# missing files and bad names


@pytest.mark.parametrize(
    ("name", "base", "hint", "places"),
    [
        ("fashion-mnist", "fashion-mnist", "apt-get install dataset-fashion", ["fashion-mnist", "FashionMNIST/raw"]),
        ("fashion-mnist-32x3", "fashion-mnist", "apt-get install dataset-fashion-mnist", ["fashion-mnist"]),
        ("mnist", "mnist", "DIR/mnist", ["mnist", "MNIST/raw"]),
        ("mnist-32", "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/", ["mnist"]),
        ("cifar10", "cifar10", "https://www.cs.toronto.edu/~kriz/cifar.html",
         ["cifar-10-batches-py", "cifar-10-python.tar.gz"]),
        ("cifar100", "cifar100", "cifar-100-python.tar.gz from https://www.cs", ["cifar100/cifar-100-python"]),
        ("svhn", "svhn", "http://ufldl.stanford.edu/housenumbers/ into DIR/svhn", ["svhn"]),
    ],
)
def test_missing_files_message(tmp_path, monkeypatch, name, base, hint, places):
    monkeypatch.setenv("DFKD_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "user"))
    with pytest.raises(DataError) as err:
        load_dataset(name, "train", root=tmp_path / "explicit")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"Run `dfkd data get {base}`" in msg
    assert hint in msg and "data.root=DIR" in msg and "DFKD_DATA" in msg
    for root in ("explicit", "env", "user/dfkd/datasets", "debian"):
        for place in places:
            assert str(tmp_path / root / place) in msg
    assert msg.index("explicit") < msg.index("env") < msg.index("user") < msg.index("debian")


def test_bad_names():
    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        load_dataset("cifar-10", "train")
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        load_dataset("digits", "val")
    with pytest.raises(ConfigError, match="unknown dataset"):
        dataset_info("imagenet")


@pytest.mark.parametrize("name", dataset_names())
def test_dataset_info(name):
    info = dataset_info(name)
    assert info.name == name and name in DATASETS
    c, h, w = info.image_shape
    assert c in (1, 3) and h == w and h in (8, 28, 32)
    assert len(info.mean) == len(info.std) == c
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)
    assert len(info.classes) == info.num_classes == len(set(info.classes))
    assert info.description and "\n" not in info.description
    with pytest.raises(AttributeError):
        info.num_classes = 3  # type: ignore[misc]


def test_registered_names():
    assert set(dataset_names()) == {
        "fashion-mnist", "fashion-mnist-32", "fashion-mnist-32x3", "mnist", "mnist-32", "digits", "digits-32",
        "cifar10", "cifar100", "svhn",
    }  # fmt: skip


# loader


def indexed_set(n=10):
    """Image i is filled with the value i and labelled i, so a batch shows which samples it holds."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2).contiguous()
    return images, torch.arange(n)


def test_loader_batches():
    images, labels = indexed_set(10)
    loader = TensorLoader(images, labels, batch_size=4, shuffle=False)
    batches = list(loader)
    assert len(loader) == 3 and loader.num_samples == 10
    assert [len(y) for _, y in batches] == [4, 4, 2]
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 2, 2)
        assert torch.equal((x[:, 0, 0, 0] * 255).round().long(), y)
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    dropped = TensorLoader(images, labels, batch_size=4, shuffle=False, drop_last=True)
    assert len(dropped) == 2 and dropped.num_samples == 8
    assert [len(y) for _, y in dropped] == [4, 4]


def test_loader_shuffle_determinism():
    images, labels = indexed_set(50)

    def orders(seed):
        loader = TensorLoader(images, labels, 16, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(2)]

    first, again = orders(3), orders(3)
    assert first == again
    assert first[0] != first[1]  # each pass draws a new order
    assert sorted(first[0]) == list(range(50)) and first[0] != list(range(50))
    assert orders(4) != first
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    assert first[0] == expected  # the order is a plain CPU randperm, the same on every device


@pytest.mark.parametrize("n", [10, 12, 13])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_loader_sharding(n, world_size):
    images, labels = indexed_set(n)
    seen = []
    for rank in range(world_size):
        g = torch.Generator().manual_seed(0)
        loader = TensorLoader(images, labels, 2, shuffle=True, rank=rank, world_size=world_size, generator=g)
        mine = [v for _, y in loader for v in y.tolist()]
        assert len(mine) == loader.num_samples and len(loader) == -(-len(mine) // 2)
        seen += mine
    assert sorted(seen) == list(range(n))

    counts, seen = set(), []
    for rank in range(world_size):
        g = torch.Generator().manual_seed(0)
        loader = TensorLoader(images, labels, 2, True, drop_last=True, rank=rank, world_size=world_size, generator=g)
        batches = [y.tolist() for _, y in loader]
        assert all(len(b) == 2 for b in batches) and len(batches) == len(loader)
        counts.add(len(batches))
        seen += [v for b in batches for v in b]
    assert len(counts) == 1  # equal steps on every rank, so DDP cannot hang
    assert len(seen) == len(set(seen))


def test_loader_augment_and_checks():
    images, labels = indexed_set(6)
    calls = []

    def augment(x):
        calls.append(x.shape[0])
        return 1 - x

    loader = TensorLoader(images, labels, 4, shuffle=False, augment=augment)
    x, y = next(iter(loader))
    assert calls == [4] and torch.allclose(x[:, 0, 0, 0], 1 - y.float() / 255)
    with pytest.raises(ValueError, match="uint8"):
        TensorLoader(images.float(), labels, 4, shuffle=False)
    with pytest.raises(ValueError, match="labels"):
        TensorLoader(images, labels[:3], 4, shuffle=False)
    with pytest.raises(ValueError, match="rank"):
        TensorLoader(images, labels, 4, shuffle=False, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(images, labels, 0, shuffle=False)


def test_float_uint8_conversions():
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(u8)), u8)
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 0.49 / 255, 0.5, 1.0, 2.0], requires_grad=True)
    assert to_uint8(x).tolist() == [0, 0, 1, 0, 128, 255, 255]
    assert to_float(u8).dtype == torch.float32 and float(to_float(u8).max()) == 1.0
    with pytest.raises(ValueError):
        to_float(u8.float())
