"""Datasets as in-memory uint8 tensors (downloaded by ``dfkd data get``), batched loading, per-sample device-side
augmentation, the synthetic pool."""

from dfkd.data.augment import (
    AUGMENTATIONS,
    Augment,
    build_augment,
    crop_flip,
    random_crop,
    random_hflip,
    random_resized_crop,
)
from dfkd.data.datasets import (
    DATASETS,
    DatasetInfo,
    candidate_roots,
    clear_cache,
    dataset_info,
    dataset_names,
    default_root,
    load_dataset,
    load_split,
    read_idx,
)
from dfkd.data.download import REMOTE, RemoteFile, get_dataset
from dfkd.data.loader import TensorLoader, to_float, to_uint8
from dfkd.data.pool import RingStore, SyntheticPool

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "Augment",
    "DatasetInfo",
    "REMOTE",
    "RemoteFile",
    "RingStore",
    "SyntheticPool",
    "TensorLoader",
    "build_augment",
    "candidate_roots",
    "clear_cache",
    "crop_flip",
    "dataset_info",
    "dataset_names",
    "default_root",
    "get_dataset",
    "load_dataset",
    "load_split",
    "random_crop",
    "random_hflip",
    "random_resized_crop",
    "read_idx",
    "to_float",
    "to_uint8",
]
