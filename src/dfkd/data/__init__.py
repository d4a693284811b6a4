"""Datasets as in-memory uint8 tensors (downloaded by ``dfkd data get``), batched loading, per-sample device-side
augmentation, batch mixing (mixup, CutMix), the synthetic pool."""

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
    source_dataset,
)
from dfkd.data.download import REMOTE, RemoteFile, get_dataset
from dfkd.data.loader import TensorLoader, to_float, to_uint8
from dfkd.data.mixing import MIXES, box_mask, cutmix, mix_batch, mixup
from dfkd.data.pool import RingStore, SyntheticPool

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "MIXES",
    "Augment",
    "DatasetInfo",
    "REMOTE",
    "RemoteFile",
    "RingStore",
    "SyntheticPool",
    "TensorLoader",
    "box_mask",
    "build_augment",
    "candidate_roots",
    "clear_cache",
    "crop_flip",
    "cutmix",
    "dataset_info",
    "dataset_names",
    "default_root",
    "get_dataset",
    "load_dataset",
    "load_split",
    "mix_batch",
    "mixup",
    "random_crop",
    "random_hflip",
    "random_resized_crop",
    "read_idx",
    "source_dataset",
    "to_float",
    "to_uint8",
]
