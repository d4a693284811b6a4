"""Real datasets as in-memory uint8 tensors, read from their standard file formats without downloading.

Every loader returns ``(images, labels)``: images uint8 ``[N, C, H, W]`` (CPU, contiguous) and labels int64 ``[N]``.
Files are searched for in the explicit ``root`` (``data.root``), then ``$DFKD_DATA``, then the per-user folder that
``dfkd data get`` fills (:func:`default_root`), then the Debian location ``/usr/share/datasets``; see
:func:`load_dataset`.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.errors import ConfigError, DataError, closest
from dfkd.registry import Registry

log = logging.getLogger(__name__)

ENV_VAR = "DFKD_DATA"
DEBIAN_ROOT = "/usr/share/datasets"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, available without reading its files.

    Attributes:
        name: registry name, e.g. ``"cifar10"``.
        num_classes: number of labels.
        image_shape: ``(C, H, W)`` of one image.
        mean: per-channel mean of the [0,1] training images (the normalisation the teachers are trained with).
        std: per-channel std, same convention.
        classes: class names, index = label.
        description: one line for ``dfkd list datasets``.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    description: str


# Reads the raw files of one split: (candidate roots) -> files that identify the data (the cache key).
Locate = Callable[[str, Sequence[Path]], tuple[Path, ...]]
# Decodes them: (files, split) -> images uint8 [N,C,H,W], labels int64 [N].
Read = Callable[[tuple[Path, ...], str], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class _Spec:
    info: DatasetInfo
    locate: Locate
    read: Read | None = None
    base: str | None = None
    derive: Callable[[Tensor], Tensor] | None = None


DATASETS: Registry[_Spec] = Registry("dataset")


def _add(info: DatasetInfo, locate: Locate, **kwargs) -> None:
    DATASETS.register(info.name)(_Spec(info, locate, **kwargs))


# (name, split, ((file, mtime_ns, size), ...)) -> (images, labels)
_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}

_DIGITS10 = tuple(str(i) for i in range(10))
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR100_CLASSES = tuple(
    """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
    """.split()
)


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered dataset.

    Args:
        name: registry name, e.g. ``"fashion-mnist-32"``.

    Returns:
        Its static description (shape, classes, normalisation constants).

    Raises:
        ConfigError: unknown name (the message suggests the closest one).
    """
    return DATASETS.get(name).info


def dataset_names() -> list[str]:
    """Sorted names of all registered datasets."""
    return DATASETS.names()


def _user_root() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "dfkd" / "datasets"


def default_root() -> Path:
    """Where ``dfkd data get`` puts files when given no root: the first entry of ``$DFKD_DATA``, else
    ``$XDG_DATA_HOME/dfkd/datasets`` (``~/.local/share/dfkd/datasets``). Both are searched by every loader."""
    first = next((p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p), None)
    return Path(first).expanduser() if first else _user_root()


def candidate_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for dataset files, in order: ``root``, each entry of ``$DFKD_DATA``, the per-user folder
    of ``dfkd data get``, the Debian location.

    Args:
        root: the explicit ``data.root``, or None.

    Returns:
        The roots, without duplicates; they need not exist.
    """
    raw: list[str] = []
    if root is not None and str(root) != "":
        raw.append(str(root))
    raw += [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    raw += [str(_user_root()), DEBIAN_ROOT]
    roots: list[Path] = []
    for r in raw:
        path = Path(r).expanduser()
        if path not in roots:
            roots.append(path)
    return roots


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Load one split of a registered dataset into memory.

    Results are cached per (name, split, files read), so calling this every epoch costs nothing after the first
    time. The returned tensors are shared with the cache: treat them as read-only.

    Args:
        name: registry name (see :func:`dataset_names`).
        split: ``"train"`` or ``"test"``.
        root: a directory to search before ``$DFKD_DATA`` and ``/usr/share/datasets``.

    Returns:
        ``(images, labels)``: uint8 ``[N, C, H, W]`` contiguous CPU tensor and int64 ``[N]``.

    Raises:
        ConfigError: unknown dataset or split.
        DataError: the files are missing or malformed (one line saying where it looked and how to get them).
    """
    spec = DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'{closest(split, SPLITS)}; use 'train' or 'test'")
    files = spec.locate(split, candidate_roots(root))
    key = (name, split, tuple(_stat(p) for p in files))
    if key in _CACHE:
        return _CACHE[key]
    if spec.base is not None:
        assert spec.derive is not None
        images, labels = load_dataset(spec.base, split, root)
        images = spec.derive(images).contiguous()
    else:
        assert spec.read is not None
        images, labels = spec.read(files, split)
    _check(spec.info, images, labels, files)
    where = ", ".join(str(p) for p in files) or "bundled data"
    log.info("loaded %s %s: %d images from %s", name, split, len(labels), where)
    _CACHE[key] = (images, labels)
    return images, labels


# The validation slice is drawn with its own fixed seed, so it is the same in every run whatever engine.seed is.
VAL_SEED = 20261201


def load_split(
    name: str, split: str, root: str | os.PathLike | None = None, val_size: int = 0
) -> tuple[Tensor, Tensor]:
    """Like :func:`load_dataset`, plus ``split="val"``: ``val_size`` training images held out by a fixed permutation.

    With ``val_size`` > 0, ``"train"`` returns the training split without those images, so a model tuned on
    ``"val"`` never trained on it; ``"test"`` is unaffected.
    """
    if split not in (*SPLITS, "val"):
        raise ConfigError(f"unknown split '{split}'{closest(split, (*SPLITS, 'val'))}; use 'train', 'val' or 'test'")
    if split == "test":
        return load_dataset(name, split, root)
    if val_size < 0:
        raise ConfigError(f"data.val_size must be >= 0, got {val_size}")
    if split == "val" and val_size == 0:
        raise ConfigError("eval.split=val needs a validation slice: set data.val_size (e.g. data.val_size=5000)")
    images, labels = load_dataset(name, "train", root)
    if val_size == 0:
        return images, labels
    if val_size >= len(labels):
        raise ConfigError(
            f"data.val_size={val_size} leaves no training images ({name} has {len(labels)}): "
            "set a smaller data.val_size, or data.val_size=0 for no validation slice"
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(VAL_SEED))
    keep = order[:val_size] if split == "val" else order[val_size:].sort().values
    return images[keep].contiguous(), labels[keep]


def clear_cache() -> None:
    """Forget every tensor cached by :func:`load_dataset`."""
    _CACHE.clear()


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or plain.

    The header is two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32; the data follow, big-endian,
    row-major. Gzip is detected from the file's magic bytes, not its name.

    Args:
        path: the file.

    Returns:
        A writable native-endian array with the stored shape.

    Raises:
        DataError: unreadable, truncated, too long, or a bad header; the message names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rb") as f:
            header = f.read(4)
            if len(header) < 4:
                raise DataError(f"{path}: truncated IDX file (no header)")
            if header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES or header[3] == 0:
                raise DataError(f"{path}: not an IDX file (bad magic number {header.hex()})")
            dtype, ndim = _IDX_DTYPES[header[2]], header[3]
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX file (header ends early)")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
            count = int(np.prod(dims, dtype=np.int64))
            nbytes = count * dtype.itemsize
            if not gz and os.path.getsize(path) != 4 + 4 * ndim + nbytes:
                have = os.path.getsize(path) - 4 - 4 * ndim
                raise DataError(f"{path}: truncated or corrupt IDX file ({have} data bytes, {dims} needs {nbytes})")
            data = np.empty(nbytes, dtype=np.uint8)
            _read_exactly(f, memoryview(data), path)
            if f.read(1):
                raise DataError(f"{path}: IDX file is longer than its header {dims} says")
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, MemoryError, ValueError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    return data.view(dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def _read_exactly(f: io.BufferedIOBase, buf: memoryview, path: Path) -> None:
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            raise DataError(f"{path}: truncated IDX file ({done} of {len(buf)} data bytes)")
        done += n


def _stat(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


def _check(info: DatasetInfo, images: Tensor, labels: Tensor, files: tuple[Path, ...]) -> None:
    """Catch files of the wrong dataset (e.g. CIFAR-100 batches in the CIFAR-10 folder) before training on them."""
    where = ", ".join(str(p) for p in files) or info.name
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != info.image_shape:
        raise DataError(f"{where}: expected {info.name} images of shape (N, {', '.join(map(str, info.image_shape))}), "
                        f"got {tuple(images.shape)} {images.dtype}")
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise DataError(f"{where}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataError(f"{where}: labels outside 0..{info.num_classes - 1} for {info.name}")


def _not_found(what: str, looked: list[Path], fetch: str, hint: str) -> DataError:
    places = ", ".join(str(p) for p in looked)
    return DataError(
        f"{what} not found; looked in: {places}. Run `dfkd data get {fetch}` (it downloads and verifies them), "
        f"or {hint}, then pass data.root=DIR or set {ENV_VAR}=DIR"
    )


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    y = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64).reshape(-1))
    return x, y


_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    # Some mirrors write "train-images.idx3-ubyte" (a dot instead of the dash).
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / (name + ".gz"), folder / name):
            if candidate.is_file():
                return candidate
    return None


def _idx_locator(subdirs: tuple[str, ...], title: str, hint: str) -> Locate:
    def locate(split: str, roots: Sequence[Path]) -> tuple[Path, ...]:
        looked = []
        for root in roots:
            for sub in subdirs:
                folder = root / sub if sub else root
                looked.append(folder)
                found = [_find_idx_file(folder, stem) for stem in _IDX_STEMS[split]]
                if all(found):
                    return tuple(found)  # type: ignore[arg-type]
        images, labels = _IDX_STEMS[split]
        raise _not_found(f"{title} {split} files ({images}[.gz], {labels}[.gz])", looked, title, hint)

    return locate


def _read_idx_pair(files: tuple[Path, ...], split: str) -> tuple[Tensor, Tensor]:
    image_file, label_file = files
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{image_file}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{label_file}: expected {len(images)} labels to match {image_file}, got shape {labels.shape}")
    return _to_tensors(images[:, None], labels)


def _pad(size: int) -> Callable[[Tensor], Tensor]:
    def pad(x: Tensor) -> Tensor:
        dh, dw = size - x.shape[-2], size - x.shape[-1]
        return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))

    return pad


def _to_three_channels(x: Tensor) -> Tensor:
    return x.repeat(1, 3, 1, 1)


def _resize(size: int) -> Callable[[Tensor], Tensor]:
    """Bilinear resize of uint8 images through float, rounded back to uint8 (torchvision's Resize on tensors)."""

    def resize(x: Tensor) -> Tensor:
        out = torch.empty(x.shape[0], x.shape[1], size, size, dtype=torch.uint8)
        for start in range(0, x.shape[0], 8192):  # bounded float memory on the full training sets
            chunk = x[start : start + 8192].float()
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out[start : start + 8192] = chunk.round_().clamp_(0, 255).to(torch.uint8)
        return out

    return resize


_FASHION_HINT = (
    "install them with 'apt-get install dataset-fashion-mnist' (it puts them in /usr/share/datasets/fashion-mnist), "
    "or copy the four IDX files into DIR/fashion-mnist"
)
# The MNIST site (yann.lecun.com/exdb/mnist) no longer serves the files; this is the mirror torchvision uses.
_MNIST_HINT = (
    "get the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz) from https://ossci-datasets.s3.amazonaws.com/mnist/ into DIR/mnist"
)
_locate_fashion = _idx_locator(("fashion-mnist", "FashionMNIST/raw", ""), "fashion-mnist", _FASHION_HINT)
_locate_mnist = _idx_locator(("mnist", "MNIST/raw", ""), "mnist", _MNIST_HINT)

_add(
    DatasetInfo("fashion-mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), _FASHION_CLASSES,
                "Fashion-MNIST, 28x28 grey, 60k/10k (apt-get install dataset-fashion-mnist)"),
    _locate_fashion, read=_read_idx_pair,
)
# Zero padding changes the statistics, so these were computed once from the real 60k training images after padding
# (pixel histogram, population std): mean 0.218999..., std 0.331811....
_add(
    DatasetInfo("fashion-mnist-32", 10, (1, 32, 32), (0.2190,), (0.3318,), _FASHION_CLASSES,
                "Fashion-MNIST zero-padded to 32x32 (LeNet-5 input)"),
    _locate_fashion, base="fashion-mnist", derive=_pad(32),
)
_add(
    DatasetInfo("fashion-mnist-32x3", 10, (3, 32, 32), (0.2190,) * 3, (0.3318,) * 3, _FASHION_CLASSES,
                "Fashion-MNIST padded to 32x32 and repeated to 3 channels (CIFAR-shaped real images)"),
    _locate_fashion, base="fashion-mnist-32", derive=_to_three_channels,
)
_add(
    DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), _DIGITS10, "MNIST, 28x28 grey, 60k/10k"),
    _locate_mnist, read=_read_idx_pair,
)
# The CMI benchmark resizes MNIST to 32x32 and keeps the 28x28 normalisation constants; so do we.
_add(
    DatasetInfo("mnist-32", 10, (1, 32, 32), (0.1307,), (0.3081,), _DIGITS10,
                "MNIST bilinearly resized to 32x32, as in the CMI benchmark (LeNet-5 input)"),
    _locate_mnist, base="mnist", derive=_resize(32),
)


def _locate_bundled(split: str, roots: Sequence[Path]) -> tuple[Path, ...]:
    return ()


def _read_digits(files: tuple[Path, ...], split: str) -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the 'digits' dataset comes with scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    # There is no official split: hold out the last 20% (floor) of each class, in file order, so it is stratified
    # and the same on every machine.
    test = np.zeros(len(labels), dtype=bool)
    for k in range(10):
        idx = np.flatnonzero(labels == k)
        test[idx[len(idx) - len(idx) // 5 :]] = True
    keep = test if split == "test" else ~test
    return _to_tensors(images[keep][:, None], labels[keep])


# Computed once from the 1,442 training images of this split, after scaling to 0..255 (and upsampling for -32).
_add(
    DatasetInfo("digits", 10, (1, 8, 8), (0.3054,), (0.3753,), _DIGITS10,
                "scikit-learn's bundled 8x8 digits, 1442/355 stratified split (pip install scikit-learn)"),
    _locate_bundled, read=_read_digits,
)
_add(
    DatasetInfo("digits-32", 10, (1, 32, 32), (0.3054,), (0.3226,), _DIGITS10,
                "scikit-learn digits bilinearly upsampled to 32x32 (LeNet-5 input)"),
    _locate_bundled, base="digits", derive=_resize(32),
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings and numpy arrays: a CIFAR batch needs nothing else, and a pickle from
    an unknown download must not be able to run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        # latin1 decodes the Python 2 strings of the official files (as torchvision does).
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:
        raise DataError(f"{where}: not a CIFAR python batch ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a CIFAR python batch (a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


@dataclass(frozen=True)
class _CifarLayout:
    folder: str  # the folder name, also the archive's top-level folder
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    hint: str


_CIFAR10 = _CifarLayout(
    "cifar-10-batches-py", "cifar-10-python.tar.gz", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
    "batches.meta", "labels", "label_names",
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into DIR (no need to extract)",
)
_CIFAR100 = _CifarLayout(
    "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "meta", "fine_labels", "fine_label_names",
    "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into DIR (no need to extract)",
)


def _cifar_locator(layout: _CifarLayout, alias: str) -> Locate:
    def locate(split: str, roots: Sequence[Path]) -> tuple[Path, ...]:
        looked = []
        wanted = getattr(layout, split)
        for root in roots:
            for base in (root, root / alias):
                folder = base / layout.folder
                looked.append(folder)
                if all((folder / m).is_file() for m in wanted):
                    return tuple(folder / m for m in wanted)
                archive = base / layout.archive
                looked.append(archive)
                if archive.is_file():
                    return (archive,)
        raise _not_found(f"{alias} {split} batches", looked, alias, layout.hint)

    return locate


def _cifar_reader(layout: _CifarLayout, expected_classes: int) -> Read:
    def read(files: tuple[Path, ...], split: str) -> tuple[Tensor, Tensor]:
        members = getattr(layout, split)
        blobs: dict[str, bytes] = {}
        if len(files) == 1 and files[0].name == layout.archive:
            archive = files[0]
            wanted = {f"{layout.folder}/{m}": m for m in (*members, layout.meta)}
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    for member in tar:  # one pass: seeking backwards in a .tar.gz means decompressing again
                        name = member.name.removeprefix("./")
                        if name in wanted and member.isfile():
                            fobj = tar.extractfile(member)
                            assert fobj is not None
                            blobs[wanted[name]] = fobj.read()
            except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
                raise DataError(f"{archive}: cannot read the archive ({e})") from e
            missing = [m for m in members if m not in blobs]
            if missing:
                raise DataError(f"{archive}: no member {layout.folder}/{missing[0]}; is this {layout.archive}?")
            sources = {m: f"{archive}:{layout.folder}/{m}" for m in blobs}
        else:
            folder = files[0].parent
            for m in (*members, layout.meta):
                if (folder / m).is_file():
                    blobs[m] = (folder / m).read_bytes()
            sources = {m: str(folder / m) for m in blobs}
        if layout.meta in blobs:
            meta = _unpickle(blobs[layout.meta], sources[layout.meta])
            names = meta.get(layout.names_key)
            if names is not None and len(names) != expected_classes:
                raise DataError(f"{sources[layout.meta]}: {len(names)} class names, expected {expected_classes}")
        images, labels = [], []
        for m in members:
            batch = _unpickle(blobs[m], sources[m])
            data, lab = batch.get("data"), batch.get(layout.label_key)
            if not isinstance(data, np.ndarray) or data.shape[1:] != (3072,) or data.dtype != np.uint8 or lab is None:
                raise DataError(f"{sources[m]}: expected 'data' N x 3072 uint8 and '{layout.label_key}'")
            if len(lab) != len(data):
                raise DataError(f"{sources[m]}: {len(data)} images but {len(lab)} labels")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(lab, dtype=np.int64))
        return _to_tensors(np.concatenate(images), np.concatenate(labels))

    return read


_add(
    DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), _CIFAR10_CLASSES,
                "CIFAR-10, 32x32 RGB, 50k/10k (python pickle batches or cifar-10-python.tar.gz)"),
    _cifar_locator(_CIFAR10, "cifar10"), read=_cifar_reader(_CIFAR10, 10),
)
_add(
    DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), _CIFAR100_CLASSES,
                "CIFAR-100 (fine labels), 32x32 RGB, 50k/10k (python pickle files or cifar-100-python.tar.gz)"),
    _cifar_locator(_CIFAR100, "cifar100"), read=_cifar_reader(_CIFAR100, 100),
)


_SVHN_HINT = "download train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into DIR/svhn"


def _locate_svhn(split: str, roots: Sequence[Path]) -> tuple[Path, ...]:
    looked = []
    for root in roots:
        for folder in (root / "svhn", root):
            looked.append(folder)
            if (folder / f"{split}_32x32.mat").is_file():
                return (folder / f"{split}_32x32.mat",)
    raise _not_found(f"svhn {split}_32x32.mat", looked, "svhn", _SVHN_HINT)


def _read_svhn(files: tuple[Path, ...], split: str) -> tuple[Tensor, Tensor]:
    import scipy.io

    (path,) = files
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except (OSError, ValueError, NotImplementedError, TypeError) as e:
        raise DataError(f"{path}: cannot read the .mat file ({e})") from e
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        shapes = [None if v is None else v.shape for v in (x, y)]
        raise DataError(f"{path}: expected X [32, 32, 3, N] and y [N, 1], got {shapes}")
    labels = y.reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN stores the digit 0 as label 10
    return _to_tensors(np.transpose(x, (3, 2, 0, 1)), labels)


_add(
    DatasetInfo("svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), _DIGITS10,
                "SVHN cropped digits, 32x32 RGB, 73k/26k (train_32x32.mat, test_32x32.mat)"),
    _locate_svhn, read=_read_svhn,
)
