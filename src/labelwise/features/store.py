"""An opened feature cache (:class:`FeatureCache`), its torch view (:class:`FeatureDataset`),
the memmap writer, and :func:`write_feature_cache` for arrays computed elsewhere. The folder
layout is described in :mod:`labelwise.features.cache`."""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from labelwise import __version__
from labelwise.errors import DataError, WriteError
from labelwise.features.key import FORMAT
from labelwise.io.atomic import atomic_write_json
from labelwise.io.jsonfile import read_json

__all__ = ["MANIFEST", "CacheWriter", "FeatureCache", "FeatureDataset", "grid_size", "label_dtype",
           "write_feature_cache"]

MANIFEST = "manifest.json"


class FeatureDataset(Dataset):
    """Torch view of a :class:`FeatureCache` for training heads on frozen features.

    Items: ``features`` float32 ``[D, h, w]``; ``mask`` int64 ``[H, W]`` (full resolution, when
    the cache has labels and ``with_labels``); ``attention`` ``{"<kind>@<block>": float32
    tensor}`` (when ``with_attention``); ``name``; ``index``. ``torch.utils.data.default_collate``
    batches them.
    """

    def __init__(self, cache: FeatureCache, with_labels: bool = True, with_attention: bool = True) -> None:
        self.cache = cache
        self.with_labels = with_labels and cache.labels is not None
        self.with_attention = with_attention and bool(cache.attention)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "features": torch.from_numpy(np.asarray(self.cache.features[index], dtype=np.float32)),
            "name": self.cache.names[index],
            "index": index,
        }
        if self.with_labels:
            item["mask"] = torch.from_numpy(np.asarray(self.cache.labels[index], dtype=np.int64))  # type: ignore[index]
        if self.with_attention:
            item["attention"] = {key: torch.from_numpy(np.asarray(array[index], dtype=np.float32))
                                 for key, array in self.cache.attention.items()}
        return item


@dataclass
class FeatureCache:
    """An opened feature cache (see the module docstring for the layout).

    Attributes:
        path: the cache folder.
        manifest: the parsed ``manifest.json``.
        features: read-only float16 (or float32, see ``storage``) memmap ``[N, D, h, w]``.
        names: the N sample names, in dataset order.
        labels: uint8/int16 memmap ``[N, H, W]`` at the preprocessed image resolution, or None.
        attention: ``{"<kind>@<block>": float16 memmap}`` (shapes in the module docstring).
        extracted: True when this call ran the backbone, False when it reopened a cache.
    """

    path: Path
    manifest: dict[str, Any]
    features: np.ndarray
    names: list[str]
    labels: np.ndarray | None = None
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    extracted: bool = False

    def __len__(self) -> int:
        return len(self.names)

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    @property
    def dim(self) -> int:
        """Feature channels D."""
        return int(self.features.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid ``(h, w)``."""
        return int(self.features.shape[2]), int(self.features.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the preprocessed images (the label resolution)."""
        height, width = self.manifest["image_size"]
        return int(height), int(width)

    @property
    def stride(self) -> int | None:
        """Pixels per patch (the ViT patch size): the grid covers the image padded to
        ``(h * stride, w * stride)``. None when unknown (logits are then resized to ``(H, W)``)."""
        stride = self.manifest.get("stride")
        return None if stride is None else int(stride)

    @property
    def ignore_index(self) -> int:
        return int((self.manifest.get("labels") or {}).get("ignore_index", 255))

    @property
    def num_classes(self) -> int | None:
        value = (self.manifest.get("labels") or {}).get("num_classes")
        return None if value is None else int(value)

    @property
    def class_names(self) -> list[str] | None:
        return (self.manifest.get("labels") or {}).get("class_names")

    def attention_map(self, block: int, kind: str = "cls") -> np.ndarray:
        """The stored ``kind`` map of ``block`` (absolute index; -1 = the deepest stored block)."""
        blocks = sorted({int(k.split("@")[1]) for k in self.attention})
        if block < 0 and blocks:
            block = blocks[block] if -len(blocks) <= block else block
        key = f"{kind}@{block}"
        if key not in self.attention:
            raise KeyError(f"{self.path}: no attention {key!r}; stored: {sorted(self.attention)}")
        return self.attention[key]

    def dataset(self, with_labels: bool = True, with_attention: bool = True) -> FeatureDataset:
        """A torch Dataset over this cache (see :class:`FeatureDataset`)."""
        return FeatureDataset(self, with_labels, with_attention)

    @classmethod
    def open(cls, path: str | Path) -> FeatureCache:
        """Open a complete cache folder; DataError naming the file when it is not one."""
        path = Path(path)
        manifest_path = path / MANIFEST
        manifest = read_json(manifest_path, "feature-cache manifest", DataError,
                             missing="not a feature cache (manifest missing)")
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("complete"):
            raise DataError(f"{manifest_path}: not a complete {FORMAT} cache")

        def load(name: Any, shape: Any) -> np.ndarray:
            if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or not name.endswith(
                    ".npy"):
                raise DataError(f"{manifest_path}: array file {name!r} is not a .npy file name inside the cache "
                                "folder; the manifest is corrupt: delete the folder to rebuild the cache")
            file = path / name
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{file}: cannot open cached array: {exc}") from exc
            if list(array.shape) != list(shape):
                raise DataError(f"{file}: shape {list(array.shape)}, the manifest says {shape}; delete the cache "
                                "folder to rebuild it")
            return array

        try:
            features = load("features.npy", manifest["features"]["shape"])
            labels_info = manifest.get("labels")
            labels = load(labels_info["file"], labels_info["shape"]) if labels_info else None
            attention = {key: load(info["file"], info["shape"]) for key, info in manifest.get("attention", {}).items()}
            names = [str(name) for name in manifest["names"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{manifest_path}: corrupt feature-cache manifest (missing or mistyped {exc}); delete "
                            "the cache folder to rebuild it") from exc
        rows = {"names": len(names), **({"labels.npy": labels.shape[0]} if labels is not None else {}),
                **{key: array.shape[0] for key, array in attention.items()}}
        for what, count in rows.items():
            if count != features.shape[0]:
                raise DataError(f"{manifest_path}: {count} {what} rows for {features.shape[0]} feature rows; delete "
                                "the cache folder to rebuild it")
        return cls(path, manifest, features, names, labels, attention)


class CacheWriter:
    """Allocates the ``.npy`` memmaps on the first batch and fills them batch by batch."""

    def __init__(self, folder: Path, num_samples: int) -> None:
        self.folder = folder
        self.num_samples = num_samples
        self.arrays: dict[str, np.ndarray] = {}
        self.files: dict[str, str] = {}

    def _array(self, key: str, file: str, shape: Sequence[int], dtype: Any) -> np.ndarray:
        if key not in self.arrays:
            path = self.folder / file
            try:
                array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(self.num_samples, *shape))
                _reserve_disk_space(path)
            except OSError as exc:
                raise WriteError(f"{path}: cannot allocate the feature cache ({exc.strerror}); free disk space or "
                                 "point LABELWISE_CACHE / features.cache_dir at a larger disk") from exc
            self.arrays[key] = array
            self.files[key] = file
        return self.arrays[key]

    def write(self, key: str, file: str, start: int, values: np.ndarray, dtype: Any) -> None:
        array = self._array(key, file, values.shape[1:], dtype)
        if tuple(array.shape[1:]) != tuple(values.shape[1:]):
            raise DataError(f"{key}: batch at sample {start} has shape {values.shape[1:]}, earlier ones {array.shape[1:]}")
        array[start:start + len(values)] = values

    def flush(self) -> None:
        for array in self.arrays.values():
            array.flush()
        for file in self.files.values():
            with open(self.folder / file, "rb") as handle:
                os.fsync(handle.fileno())
        self.arrays.clear()


def _reserve_disk_space(path: Path) -> None:
    """Allocate the blocks of the sparse file ``path`` now: writing through a memory map into a
    full disk kills the process with SIGBUS, where allocating first fails with ENOSPC."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # file systems without fallocate
            return
        raise
    finally:
        os.close(fd)


def label_dtype(ignore_index: int, num_classes: int | None) -> Any:
    largest = max(ignore_index, (num_classes or 0) - 1)
    return np.uint8 if 0 <= ignore_index and largest <= 255 else np.int16


def write_feature_cache(path: str | Path, features: np.ndarray | Tensor, names: Sequence[str], *,
                        labels: np.ndarray | Tensor | None = None, stride: int | None = None,
                        image_size: Sequence[int] | None = None, ignore_index: int = 255,
                        num_classes: int | None = None, class_names: Sequence[str] | None = None,
                        attention: Mapping[str, np.ndarray | Tensor] | None = None) -> FeatureCache:
    """Write arrays computed elsewhere as a cache folder at ``path`` (atomically) and open it.

    ``features [N, D, h, w]``; ``labels [N, H, W]`` at image resolution; ``attention`` as
    ``{"<kind>@<block>": [N, ...]}``. ``image_size`` defaults to the labels' size, else
    ``(h * stride, w * stride)``.
    """
    path = Path(path)
    features_np = (features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features))
    if features_np.ndim != 4 or len(names) != features_np.shape[0]:
        raise ValueError(f"features must be [N, D, h, w] with N = {len(names)} names; got {features_np.shape}")
    labels_np = None if labels is None else (labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels))
    if image_size is None:
        if labels_np is not None:
            image_size = labels_np.shape[-2:]
        elif stride is not None:
            image_size = (features_np.shape[2] * stride, features_np.shape[3] * stride)
        else:
            raise ValueError("write_feature_cache: give image_size, labels or stride")
    if path.exists():
        raise FileExistsError(f"{path}: already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".partial-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        writer = CacheWriter(staging, len(names))
        writer.write("features", "features.npy", 0, features_np.astype(np.float16), np.float16)
        manifest_labels = None
        if labels_np is not None:
            dtype = label_dtype(ignore_index, num_classes)
            writer.write("labels", "labels.npy", 0, labels_np.astype(dtype), dtype)
            manifest_labels = {"file": "labels.npy", "shape": list(labels_np.shape), "dtype": str(np.dtype(dtype)),
                               "resolution": "image", "ignore_index": int(ignore_index), "num_classes": num_classes,
                               "class_names": list(class_names) if class_names else None}
        manifest_attention = {}
        for key, values in (attention or {}).items():
            array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
            kind, block = key.split("@")
            file = f"attention_{kind}_{block}.npy"
            writer.write(key, file, 0, array.astype(np.float16), np.float16)
            manifest_attention[key] = {"file": file, "shape": list(array.shape), "dtype": "float16"}
        writer.flush()
        atomic_write_json(staging / MANIFEST, {
            "format": FORMAT, "key": path.name, "complete": True, "labelwise_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "num_samples": len(names),
            "image_size": [int(v) for v in image_size], "stride": stride,
            "features": {"file": "features.npy", "shape": list(features_np.shape), "dtype": "float16"},
            "labels": manifest_labels, "attention": manifest_attention, "names": [str(n) for n in names],
            "description": {"source": "write_feature_cache"},
        })
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FeatureCache.open(path)


def grid_size(image_size: Sequence[int], stride: int) -> tuple[int, int]:
    """Patch grid ``(ceil(H / stride), ceil(W / stride))`` of an image size."""
    return math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)
