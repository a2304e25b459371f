"""The data layer: datasets yielding :class:`Sample` dicts, batch transforms, statistics.

Every dataset yields ``image`` float32 ``[3, H, W]`` in [0, 1], ``mask`` int64 ``[H, W]``
(``class_map.ignore_index``, default 255, where unlabeled) and ``name``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from labelwise.data.aerial import AerialTiles, RandomCropDataset
from labelwise.data.base import Sample, SegmentationDataset
from labelwise.data.camvid import CamVid
from labelwise.data.classmap import ClassMap
from labelwise.data.collate import pad_collate
from labelwise.data.folder import FolderDataset, PairSource
from labelwise.data.images import ImageFolderDataset
from labelwise.data.io import read_image, read_label
from labelwise.data.isprs import IsprsTiles
from labelwise.data.stats import class_balanced_weights, class_frequencies, one_hot
from labelwise.data.synthetic import SyntheticShapes
from labelwise.data.tags import ImageTags, read_tag_file, tags_from_dataset, tags_from_masks
from labelwise.data.transforms import AugmentConfig, PairedAugment, resize_batch
from labelwise.errors import ConfigError

__all__ = [
    "AerialTiles",
    "IsprsTiles",
    "AugmentConfig",
    "CamVid",
    "ClassMap",
    "FolderDataset",
    "ImageFolderDataset",
    "ImageTags",
    "PairSource",
    "PairedAugment",
    "RandomCropDataset",
    "Sample",
    "SegmentationDataset",
    "SyntheticShapes",
    "build_dataset",
    "class_balanced_weights",
    "class_frequencies",
    "one_hot",
    "pad_collate",
    "read_image",
    "read_label",
    "read_tag_file",
    "resize_batch",
    "tags_from_dataset",
    "tags_from_masks",
]

DATASET_KINDS: dict[str, Callable[..., SegmentationDataset]] = {
    "synthetic": SyntheticShapes,
    "folder": FolderDataset,
    "camvid": CamVid,
    "aerial": AerialTiles,
    "isprs": IsprsTiles,
}
#: Keyword arguments that wrap a file dataset in :class:`RandomCropDataset`.
CROP_KEYS = ("crop_size", "samples_per_epoch", "seed", "cache_megabytes", "crops_per_tile")


def _parameters(factory: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(factory).parameters if p != "self"]


def build_dataset(kind: str, **kwargs: Any) -> SegmentationDataset:
    """Build a dataset by kind name from plain keyword arguments.

    Kinds: ``"synthetic"`` (:class:`SyntheticShapes`), ``"folder"`` (:class:`FolderDataset`),
    ``"camvid"`` (:class:`CamVid`), ``"aerial"`` (:class:`AerialTiles`), ``"isprs"``
    (:class:`~labelwise.data.isprs.IsprsTiles`). For the file kinds,
    passing ``crop_size`` (and ``samples_per_epoch``, optional ``seed``, ``cache_megabytes``,
    ``crops_per_tile``) wraps the dataset in :class:`RandomCropDataset`.

    Raises:
        ConfigError: unknown kind (lists the valid ones) or unknown keyword argument.
    """
    if kind not in DATASET_KINDS:
        raise ConfigError(f"dataset kind {kind!r} is unknown; valid kinds: {sorted(DATASET_KINDS)}")
    factory = DATASET_KINDS[kind]
    accepted = _parameters(factory)
    crop_args: dict[str, Any] = {}
    if kind != "synthetic" and kwargs.get("crop_size") is not None:
        crop_args = {k: kwargs.pop(k) for k in CROP_KEYS if k in kwargs}
        if "samples_per_epoch" not in crop_args:
            raise ConfigError(f"dataset {kind!r}: crop_size needs samples_per_epoch (crops per epoch)")
    elif kind != "synthetic":
        kwargs.pop("crop_size", None)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        valid = accepted + (list(CROP_KEYS) if kind != "synthetic" else [])
        raise ConfigError(f"dataset {kind!r}: unknown argument(s) {unknown}; valid: {valid}")
    dataset = factory(**kwargs)
    if crop_args:
        dataset = RandomCropDataset(dataset, **crop_args)  # type: ignore[arg-type]
    return dataset
