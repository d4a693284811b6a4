"""Runs without a registered dataset: ``data.name=none`` (no data at all) and ``data.name=folder`` (a test set).

Both take the facts a registered dataset would give (class count, image shape, mean/std, class names) from the
``data`` config and from the teacher's own metadata (:class:`~dfkd.models.meta.TeacherMeta`). Where both give one:
the class count and class names must agree (they describe the teacher's logits, a mismatch is a wrong teacher or a
wrong config); the config wins for mean/std and the image height and width (a teacher may be run at another
resolution, its normalisation corrected), while the channel count must agree.

``data.name=folder`` reads an ImageFolder-style tree (``ROOT/CLASS/IMAGE.png``) with Pillow as the evaluation split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dfkd.data.datasets import DatasetInfo, dataset_info
from dfkd.errors import ConfigError, DataError, closest
from dfkd.models.loading import resolve_weights
from dfkd.models.meta import TeacherMeta

log = logging.getLogger(__name__)

NO_DATA, FOLDER = "none", "folder"
DATA_FREE_NAMES = (NO_DATA, FOLDER)
# torchvision's ImageFolder extensions, plus .gif
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def is_data_free(name: str) -> bool:
    """True for ``data.name`` none or folder: the run's facts come from the config and the teacher, not a registry."""
    return name in DATA_FREE_NAMES


def checkpoint_record(weights: str | os.PathLike | None) -> dict:
    """The top-level entries of a weights file other than its tensors (empty for none, and for a file that is not a
    dict of tensors: the teacher loader that reads it says what is wrong with it)."""
    if not weights:
        return {}
    try:
        obj = torch.load(resolve_weights(str(weights)), map_location="cpu", weights_only=True)
    except Exception:  # missing, or not a weights-only torch file (TorchScript, foreign pickle): it states nothing
        return {}
    if not isinstance(obj, dict):
        return {}
    return {str(k): v for k, v in obj.items() if isinstance(v, (bool, int, float, str, list))}


def checkpoint_meta(weights: str | os.PathLike | None, record: dict | None = None) -> TeacherMeta:
    """What a dfkd checkpoint states about its network: class count, and the shape, normalisation and class names
    of its run (recorded by a data-free distillation, else those of the registered dataset it names). Empty for
    other files. ``record``: the file's :func:`checkpoint_record`, when the caller has read it already."""
    meta = checkpoint_record(weights) if record is None else record
    if isinstance(meta.get("image_shape"), list) and isinstance(meta.get("mean"), list):
        classes = meta.get("classes")
        return TeacherMeta(
            tuple(meta["mean"]),
            tuple(meta.get("std") or ()) or None,
            tuple(meta["image_shape"]),
            _int_or_none(meta.get("num_classes")),
            tuple(classes) if isinstance(classes, list) else None,
            str(weights),
        )
    name = meta.get("dataset")
    if isinstance(name, str) and name and not is_data_free(name):
        try:
            info = dataset_info(name)
        except ConfigError:
            info = None
        if info is not None:
            return TeacherMeta(info.mean, info.std, info.image_shape, info.num_classes, info.classes, str(weights))
    return TeacherMeta(num_classes=_int_or_none(meta.get("num_classes")), source=str(weights or ""))


def zoo_sizes(data_cfg: Any, meta: TeacherMeta, recorded: dict) -> tuple[int | None, int | None]:
    """``(num_classes, in_channels)`` to build a zoo network for a data-free run: config, else the teacher's meta,
    else what its dfkd checkpoint records (``recorded``: its :func:`checkpoint_record`), else (the class count of a
    folder run) the class folders; None where nobody says."""
    num_classes = data_cfg.num_classes or (len(data_cfg.class_names) if data_cfg.class_names else None)
    in_channels = data_cfg.image_shape[0] if data_cfg.image_shape else None
    num_classes = num_classes or meta.num_classes or _int_or_none(recorded.get("num_classes"))
    if num_classes is None and data_cfg.name == FOLDER:
        num_classes = len(_class_folders(data_cfg.root))  # the folders are the classes
    in_channels = in_channels or (meta.input_shape[0] if meta.input_shape else None)
    return num_classes, in_channels or _int_or_none(recorded.get("in_channels"))


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _agreeing(key: str, configured: Any, stated: Any, source: str) -> Any:
    if configured is not None and stated is not None and configured != stated:
        raise ConfigError(
            f"{key}={configured!r} but the teacher{source} says {stated!r}: drop {key} or use the matching teacher"
        )
    return configured if configured is not None else stated


def resolve_dataset_info(data_cfg: Any, meta: TeacherMeta | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of a run: the registered dataset's, or for ``data.name`` none/folder one assembled
    from the ``data`` config and the teacher's metadata (see the module docstring for which wins).

    Args:
        data_cfg: the run's ``data`` section (:class:`~dfkd.config.DataConfig`).
        meta: what the teacher states about itself (:func:`~dfkd.models.meta.teacher_meta`); None = nothing.

    Raises:
        ConfigError: a fact nobody gives (the message names the keys to set), or config and teacher disagree.
        DataError: data.name=folder without class names, and data.root is not a tree of class folders.
    """
    name = data_cfg.name
    if not is_data_free(name):
        return dataset_info(name)
    meta = meta or TeacherMeta()
    source = f" ({meta.source})" if meta.source else ""
    names = tuple(data_cfg.class_names) if data_cfg.class_names else None
    classes = _agreeing("data.class_names", names, meta.classes, source)
    num_classes = _agreeing("data.num_classes", data_cfg.num_classes, meta.num_classes, source)
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise ConfigError(
            f"{len(classes)} class names (data.class_names or the teacher's) for {num_classes} classes "
            "(data.num_classes or the teacher's): give one name per class"
        )
    if classes is not None:
        num_classes = len(classes)
    if name == FOLDER and classes is None:
        folders = _class_folders(data_cfg.root)
        if all(folder.isdigit() for folder in folders):
            # folders named by class index: "10" is class 10 (not the third folder in text order), and a test set
            # may hold some of the classes only
            count = num_classes if num_classes is not None else len(folders)
            classes = tuple(str(i) for i in range(count))
        else:
            classes = tuple(folders)
        if num_classes is not None and len(classes) != num_classes:
            raise ConfigError(
                f"{data_cfg.root} has {len(classes)} class folders but the teacher has {num_classes} classes: "
                "name the teacher's classes with data.class_names=[...] so the folders can be matched to them"
            )
        num_classes = len(classes)
    shape = _image_shape(data_cfg.image_shape, meta.input_shape, source)
    channels = shape[0] if shape else None
    mean = _channel_values("data.mean", data_cfg.mean or meta.mean, channels)
    std = _channel_values("data.std", data_cfg.std or meta.std, channels)
    missing = [
        key
        for key, value in (
            ("data.num_classes", num_classes),
            ("data.image_shape (e.g. [3,32,32])", shape),
            ("data.mean", mean),
            ("data.std", std),
        )
        if value is None
    ]
    if missing:
        raise ConfigError(
            f"data.name={name} needs {', '.join(missing)}: set them, or use a teacher whose source states them "
            "(timm, torchvision, a dfkd checkpoint or export)"
        )
    assert num_classes is not None and shape is not None and mean is not None and std is not None
    if num_classes < 1:
        raise ConfigError(f"data.num_classes={num_classes}: give 1 or more")
    if any(s <= 0 for s in std):
        raise ConfigError(f"data.std={list(std)}: every value must be positive")
    if name == NO_DATA:
        description = "no dataset: evaluated on held-out synthetic images"
    else:
        description = f"image folder {data_cfg.root}"
    return DatasetInfo(
        name,
        int(num_classes),
        shape,
        mean,
        std,
        classes if classes is not None else tuple(str(i) for i in range(num_classes)),
        description,
    )


def _image_shape(configured: Sequence[int] | None, stated: Sequence[int] | None, source: str):
    if configured is not None:
        if len(configured) != 3 or any(int(v) < 1 for v in configured):
            raise ConfigError(f"data.image_shape={list(configured)}: give channels, height, width, e.g. [3,32,32]")
        if stated is not None and int(configured[0]) != int(stated[0]):
            raise ConfigError(
                f"data.image_shape has {configured[0]} channels but the teacher{source} takes {stated[0]}: "
                "give its channel count"
            )
        if stated is not None and tuple(configured) != tuple(stated):
            log.info("images at %s (data.image_shape) instead of the teacher's %s", list(configured), list(stated))
        return tuple(int(v) for v in configured)
    return tuple(int(v) for v in stated) if stated is not None else None


def _channel_values(key: str, values: Sequence[float] | None, channels: int | None) -> tuple[float, ...] | None:
    if values is None or channels is None:
        return None if values is None else tuple(float(v) for v in values)
    if len(values) == 1:
        return (float(values[0]),) * channels  # one value for every channel
    if len(values) != channels:
        raise ConfigError(f"{key} has {len(values)} values for images of {channels} channels: give 1 or {channels}")
    return tuple(float(v) for v in values)


def check_data_free_eval(data_cfg: Any, eval_split: str) -> None:
    """The evaluation settings a data-free run cannot honour are errors, not silently ignored."""
    if not is_data_free(data_cfg.name):
        return
    if eval_split == "val":
        raise ConfigError(
            f"data.name={data_cfg.name} has no training split to hold a validation slice out of: drop eval.split=val"
        )
    if data_cfg.name == NO_DATA and (data_cfg.heldout_size < 1 or data_cfg.heldout_steps < 0):
        raise ConfigError(
            f"data.heldout_size={data_cfg.heldout_size}, data.heldout_steps={data_cfg.heldout_steps}: give a size of "
            "1 or more and 0 or more steps"
        )


def _folder_root(root: str | os.PathLike | None) -> Path:
    if root is None or str(root) == "":
        raise ConfigError("data.name=folder needs data.root=DIR: a folder with one sub-folder of images per class")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: not a directory; data.root must be a folder with one sub-folder of images per class")
    return path


def _class_folders(root: str | os.PathLike | None) -> list[str]:
    path = _folder_root(root)
    names = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{path}: no class folders; expected {path}/CLASS_NAME/IMAGE.png, one folder per class")
    return names


def load_image_folder(root: str | os.PathLike | None, info: DatasetInfo) -> tuple[Tensor, Tensor]:
    """Read an ImageFolder-style tree into memory for evaluation: each ``ROOT/CLASS/IMAGE`` labelled by the index
    of ``CLASS`` in ``info.classes`` (or by ``CLASS`` itself where it is an index and no class name), converted to
    ``info.image_shape``'s channels and resized to its size.

    Args:
        root: the folder (``data.root``).
        info: the run's facts (:func:`resolve_dataset_info`): class names, image shape.

    Returns:
        ``(images, labels)``: uint8 ``[N, C, H, W]`` and int64 ``[N]``, CPU, in class then file-name order.

    Raises:
        DataError: no class folders, a folder that names no class, no images, an unreadable image (the message
            names the path).
    """
    from PIL import Image, UnidentifiedImageError

    path = _folder_root(root)
    index = {name: i for i, name in enumerate(info.classes)}
    channels, height, width = info.image_shape
    if channels not in (1, 3):
        raise DataError(f"{path}: images can be read as 1 or 3 channels, the teacher takes {channels}")
    mode = "L" if channels == 1 else "RGB"
    images, labels = [], []
    for folder in _class_folders(path):
        label = index.get(folder)
        if label is None and folder.isdigit() and int(folder) < len(info.classes):
            label = int(folder)  # a class whose name cannot be a folder name ("T-shirt/top") by its index
        if label is None:
            raise DataError(
                f"{path / folder}: folder '{folder}' names no class of the teacher{closest(folder, info.classes)}; "
                "rename it to one of the class names (data.class_names) or its index, or remove it"
            )
        files = sorted(p for p in (path / folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        for file in files:
            try:
                with Image.open(file) as img:
                    pixels = torch.frombuffer(bytearray(img.convert(mode).tobytes()), dtype=torch.uint8)
                    size = img.size
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise DataError(f"{file}: cannot read the image ({exc})") from None
            x = pixels.view(size[1], size[0], channels).permute(2, 0, 1)
            images.append(_resized(x, height, width))
            labels.append(label)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    log.info("loaded image folder %s: %d images of %d classes", path, len(images), len(set(labels)))
    return torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.int64)


def _resized(x: Tensor, height: int, width: int) -> Tensor:
    """Bilinear (antialiased) resize of one uint8 image [C, h, w], rounded back to uint8."""
    if tuple(x.shape[1:]) == (height, width):
        return x.contiguous()
    out = F.interpolate(x[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


__all__ = [
    "DATA_FREE_NAMES",
    "FOLDER",
    "NO_DATA",
    "check_data_free_eval",
    "checkpoint_meta",
    "checkpoint_record",
    "is_data_free",
    "load_image_folder",
    "resolve_dataset_info",
    "zoo_sizes",
]
