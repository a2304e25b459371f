"""Frozen-backbone features of a whole dataset, streamed once into a memory-mapped cache.

``extract_features(backbone, dataset, preprocessing={...})`` runs the backbone over every sample
(batched, bf16 autocast where allowed, data loading overlapped with compute by DataLoader
worker processes with a deep prefetch queue and pinned memory on CUDA) and writes::

    <cache_dir>/<key>/manifest.json          what is stored, shapes, names, how it was made
                     /features.npy           float16 [N, D, h, w] patch features
                     /labels.npy             uint8 (int16 when needed) [N, H, W] masks, optional
                     /attention_<kind>_<block>.npy   attention maps asked for, float16

The ``.npy`` files are opened with ``numpy.load(mmap_mode="r")``, so a cache larger than memory
is paged in on demand. ``key`` is a SHA-256 over the backbone weights (every tensor of its
state dict), its configuration, the ``preprocessing`` dict, the precision, the attention maps
asked for, whether labels are stored, and the dataset's identity (class, length, plain public
attributes such as ``seed`` or ``resize``) and sample names. A second call with the same key
opens the cache without running the backbone; pixel contents are *not* hashed, so after editing
image files in place pass ``refresh=True`` (or delete the folder).

Crash safety: everything is written into ``<cache_dir>/.partial-<key>-<pid>-<random>/`` and the
folder is renamed to ``<key>`` only after every array is flushed and the manifest (written last)
is on disk. Only folders named exactly by a key are ever opened, so an interrupted extraction
never looks like a complete cache; its left-over partial folder is deleted by the next
extraction of the same key once the process that made it is gone.

Fixed image size: features are one ``[N, D, h, w]`` array, so every preprocessed image must have
the same size. ``preprocessing`` may hold ``resize`` (``N`` or ``[H, W]``: bilinear,
antialiased; masks nearest at pixel centres) and ``crop`` (``[H, W]``: centre crop after
resizing). A sample whose size differs from the first is a ``DataError`` naming it.

Labels: when the dataset yields ``mask`` (and ``labels=True``), the masks are stored at the
*full preprocessed image resolution* ``[H, W]`` (not pooled to the patch grid), so probes can
upsample logits and be scored at label resolution. ``ignore_index`` comes from the dataset's
``class_map`` (default 255).

Attention (ViT backbones): ``attention_blocks`` names blocks (negative = from the end) and
``attention_kinds`` what to keep of each block's ``[B, heads, N, N]`` map (``P`` prefix tokens:
class token + registers; patches row-major):

- ``"cls"``: class token -> patches, every head, ``[N, heads, h, w]``;
- ``"patch"``: patches -> patches, mean over heads, ``[N, h*w, h*w]`` (rows sum to less than 1:
  the prefix columns are dropped, nothing is renormalised);
- ``"neighbourhood"``: the ``"patch"`` weights of each patch to its 3x3 neighbours,
  ``[N, 9, h, w]`` with neighbour ``(dy, dx)`` at index ``3 * (dy + 1) + (dx + 1)`` and 0 outside
  the grid (see :func:`neighbourhood_attention`; apply your own row processing to ``"patch"``
  first if a method needs it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from labelwise import __version__
from labelwise.engine.atomic import atomic_write_json
from labelwise.engine.runtime import autocast, resolve_device
from labelwise.errors import ConfigError, DataError

__all__ = [
    "ATTENTION_KINDS",
    "FeatureCache",
    "FeatureDataset",
    "cache_key",
    "default_cache_dir",
    "extract_features",
    "neighbourhood_attention",
    "normalise_preprocessing",
    "preprocess",
    "write_feature_cache",
]

FORMAT = "labelwise-features/1"
ATTENTION_KINDS = ("cls", "patch", "neighbourhood")
PREPROCESSING_KEYS = ("resize", "crop")
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$LABELWISE_CACHE/features`` when the variable is set, else ``~/.cache/labelwise/features``."""
    root = os.environ.get("LABELWISE_CACHE")
    return Path(root).expanduser() / "features" if root else Path.home() / ".cache" / "labelwise" / "features"


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _size_pair(key: str, value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ConfigError(f"preprocessing.{key}: expected a positive int or [H, W], got {value!r}")
    return [int(value[0]), int(value[1])]


def normalise_preprocessing(preprocessing: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated canonical form of a preprocessing dict (sizes as ``[H, W]`` lists).

    Raises ConfigError naming an unknown key or a bad value.
    """
    result: dict[str, Any] = {}
    for key, value in (preprocessing or {}).items():
        if key not in PREPROCESSING_KEYS:
            raise ConfigError(f"preprocessing.{key}: unknown key (valid keys: {list(PREPROCESSING_KEYS)})")
        if value is not None:
            result[key] = _size_pair(key, value)
    return result


def _resize_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest neighbour at pixel centres (as ``labelwise.data.folder.resize_mask``)."""
    in_h, in_w = mask.shape[-2:]
    height, width = size
    rows = ((torch.arange(height, dtype=torch.float64) + 0.5) * (in_h / height)).long().clamp_(max=in_h - 1)
    cols = ((torch.arange(width, dtype=torch.float64) + 0.5) * (in_w / width)).long().clamp_(max=in_w - 1)
    return mask[..., rows[:, None], cols[None, :]]


def preprocess(image: Tensor, mask: Tensor | None, preprocessing: Mapping[str, Any], name: str = "?"
               ) -> tuple[Tensor, Tensor | None]:
    """Apply a (normalised) preprocessing dict to ``image [3, H, W]`` and ``mask [H, W]``."""
    if "resize" in preprocessing:
        size = tuple(preprocessing["resize"])
        if tuple(image.shape[-2:]) != size:
            image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                                  antialias=True)[0].clamp_(0.0, 1.0)
            if mask is not None:
                mask = _resize_mask(mask, size)
    if "crop" in preprocessing:
        crop_h, crop_w = preprocessing["crop"]
        height, width = image.shape[-2:]
        if crop_h > height or crop_w > width:
            raise DataError(f"sample {name!r}: crop {crop_h}x{crop_w} is larger than the image {height}x{width}")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        image = image[:, top:top + crop_h, left:left + crop_w]
        if mask is not None:
            mask = mask[top:top + crop_h, left:left + crop_w]
    return image.contiguous(), None if mask is None else mask.contiguous()


class _Prepared(Dataset):
    """Worker-side view: load, check, preprocess. Yields image, optional mask, name, index."""

    def __init__(self, dataset: Dataset, preprocessing: dict[str, Any], with_labels: bool) -> None:
        self.dataset = dataset
        self.preprocessing = preprocessing
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        name = str(sample.get("name", index))
        image = sample["image"]
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
            raise DataError(f"sample {name!r}: expected image float [3, H, W] in [0, 1], got {got}")
        mask = sample.get("mask") if self.with_labels else None
        image, mask = preprocess(image.float(), mask, self.preprocessing, name)
        return {"image": image, "mask": mask, "name": name, "index": index}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch; a size mismatch is reported (not raised) so the main process can name it."""
    first = tuple(samples[0]["image"].shape[-2:])
    for sample in samples:
        size = tuple(sample["image"].shape[-2:])
        if size != first:
            return {"mismatch": (sample["name"], size, samples[0]["name"], first)}
    masks = [s["mask"] for s in samples]
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack(masks) if all(m is not None for m in masks) else None,
        "name": [s["name"] for s in samples],
        "index": [s["index"] for s in samples],
    }


# ---------------------------------------------------------------------------------------------
# Cache key


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-able copy of small plain values (None when ``value`` is not plain)."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)) and len(value) <= 16 and depth < 2:
        items = [_plain(v, depth + 1) for v in value]
        return items if all(i is not None or v is None for i, v in zip(items, value)) else None
    return None


def _dataset_identity(dataset: Dataset) -> dict[str, Any]:
    custom = getattr(dataset, "cache_identity", None)
    if callable(custom):
        return {"custom": custom()}
    if isinstance(dataset, Subset):
        return {"subset_of": _dataset_identity(dataset.dataset)}
    identity: dict[str, Any] = {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
                                "length": len(dataset)}  # type: ignore[arg-type]
    for key, value in sorted(vars(dataset).items()):
        if key.startswith("_") or key == "names":
            continue
        plain = _plain(value)
        if plain is not None:
            identity[key] = plain
    return identity


def dataset_names(dataset: Dataset) -> list[str]:
    """Sample names: ``dataset.names`` when it has them (a Subset maps its indices), otherwise
    read from every sample (one pass over the data, without the backbone)."""
    if isinstance(dataset, Subset):
        return [dataset_names(dataset.dataset)[i] for i in dataset.indices]
    names = getattr(dataset, "names", None)
    if isinstance(names, (list, tuple)) and len(names) == len(dataset):  # type: ignore[arg-type]
        return [str(n) for n in names]
    return [str(dataset[i].get("name", i)) for i in range(len(dataset))]  # type: ignore[arg-type]


def _backbone_description(backbone: nn.Module) -> dict[str, Any]:
    description: dict[str, Any] = {"class": f"{type(backbone).__module__}.{type(backbone).__qualname__}"}
    config = getattr(backbone, "config", None)
    if hasattr(config, "to_dict"):
        description["config"] = config.to_dict()
    elif callable(config):
        try:
            description["config"] = config()
        except TypeError:
            pass
    return json.loads(json.dumps(description, default=str))


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor of ``module.state_dict()`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(backbone: nn.Module, dataset: Dataset, preprocessing: Mapping[str, Any] | None = None, *,
              precision: str = "bf16", attention_blocks: Sequence[int] = (),
              attention_kinds: Sequence[str] = ("cls",), labels: bool = True,
              names: Sequence[str] | None = None) -> tuple[str, dict[str, Any]]:
    """``(key, description)`` of the cache ``extract_features`` would write for these inputs."""
    names = list(names) if names is not None else dataset_names(dataset)
    description = {
        "format": FORMAT,
        "backbone": _backbone_description(backbone),
        "weights_sha256": weights_digest(backbone),
        "preprocessing": normalise_preprocessing(preprocessing),
        "precision": precision,
        "attention": {"blocks": _attention_blocks(backbone, attention_blocks),
                      "kinds": sorted(attention_kinds) if attention_blocks else []},
        "labels": bool(labels),
        "dataset": _dataset_identity(dataset),
        "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
    return key, description


def _attention_blocks(backbone: nn.Module, blocks: Sequence[int]) -> list[int]:
    """Block indices made non-negative using the backbone's depth (when it has ``blocks``)."""
    depth = getattr(backbone, "depth", None)
    if depth is None and hasattr(backbone, "blocks"):
        depth = len(backbone.blocks)  # type: ignore[arg-type]
    result = []
    for block in blocks:
        if isinstance(block, bool) or not isinstance(block, int):
            raise ConfigError(f"attention_blocks: block indices must be ints, got {block!r}")
        if depth is not None:
            if not -depth <= block < depth:
                raise ConfigError(f"attention_blocks: block {block} out of range for a backbone of depth {depth}")
            block %= depth
        result.append(block)
    return sorted(set(result))


# ---------------------------------------------------------------------------------------------
# Attention reductions


def neighbourhood_attention(patch_attention: Tensor, grid: Sequence[int], radius: int = 1) -> Tensor:
    """Weights of each patch to its ``(2r+1)^2`` neighbours.

    Args:
        patch_attention: ``[B, h*w, h*w]`` patch -> patch weights (rows: querying patch).
        grid: ``(h, w)``.

    Returns:
        ``[B, (2r+1)^2, h, w]``; channel ``(2r+1) * (dy + r) + (dx + r)`` holds the weight of patch
        ``(y, x)`` to ``(y + dy, x + dx)``, 0 where that neighbour is outside the grid.
    """
    h, w = int(grid[0]), int(grid[1])
    batch = patch_attention.shape[0]
    rows = patch_attention.reshape(batch, h, w, h * w)
    ys = torch.arange(h, device=patch_attention.device)
    xs = torch.arange(w, device=patch_attention.device)
    out = patch_attention.new_zeros(batch, (2 * radius + 1) ** 2, h, w)
    channel = 0
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ny, nx = ys + dy, xs + dx
            valid = ((ny >= 0) & (ny < h))[:, None] & ((nx >= 0) & (nx < w))[None, :]
            target = ny.clamp(0, h - 1)[:, None] * w + nx.clamp(0, w - 1)[None, :]  # [h, w]
            gathered = torch.gather(rows, 3, target.expand(batch, h, w)[..., None])[..., 0]
            out[:, channel] = gathered * valid
            channel += 1
    return out


def _reduce_attention(weights: Tensor, kind: str, prefix: int, grid: tuple[int, int]) -> Tensor:
    h, w = grid
    weights = weights.float()
    if kind == "cls":
        return weights[:, :, 0, prefix:].reshape(weights.shape[0], weights.shape[1], h, w)
    patch = weights[:, :, prefix:, prefix:].mean(1)
    if kind == "patch":
        return patch
    if kind == "neighbourhood":
        return neighbourhood_attention(patch, grid)
    raise ConfigError(f"attention_kinds: unknown kind {kind!r} (valid: {list(ATTENTION_KINDS)})")


def _patch_tokens(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        features = output
    elif hasattr(output, "patch_tokens"):
        features = output.patch_tokens
    elif isinstance(output, (list, tuple)) and output and isinstance(output[-1], Tensor):
        features = output[-1]
    else:
        raise ConfigError(f"backbone returned {type(output).__name__}; expected patch_tokens [B, D, h, w]")
    if features.dim() != 4:
        raise ConfigError(f"backbone features must be [B, D, h, w], got shape {tuple(features.shape)}")
    return features


# ---------------------------------------------------------------------------------------------
# The cache


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
        features: read-only float16 memmap ``[N, D, h, w]``.
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
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError as exc:
            raise DataError(f"{manifest_path}: not a feature cache (manifest missing)") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest_path}: corrupt feature-cache manifest: {exc}") from exc
        if manifest.get("format") != FORMAT or not manifest.get("complete"):
            raise DataError(f"{manifest_path}: not a complete {FORMAT} cache")

        def load(name: str, shape: Sequence[int]) -> np.ndarray:
            file = path / name
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"{file}: cannot open cached array: {exc}") from exc
            if list(array.shape) != list(shape):
                raise DataError(f"{file}: shape {list(array.shape)}, the manifest says {list(shape)}")
            return array

        features = load("features.npy", manifest["features"]["shape"])
        labels_info = manifest.get("labels")
        labels = load(labels_info["file"], labels_info["shape"]) if labels_info else None
        attention = {key: load(info["file"], info["shape"]) for key, info in manifest.get("attention", {}).items()}
        names = list(manifest["names"])
        if len(names) != features.shape[0]:
            raise DataError(f"{manifest_path}: {len(names)} names for {features.shape[0]} feature rows")
        return cls(path, manifest, features, names, labels, attention)


class _CacheWriter:
    """Allocates the ``.npy`` memmaps on the first batch and fills them batch by batch."""

    def __init__(self, folder: Path, num_samples: int) -> None:
        self.folder = folder
        self.num_samples = num_samples
        self.arrays: dict[str, np.ndarray] = {}
        self.files: dict[str, str] = {}

    def _array(self, key: str, file: str, shape: Sequence[int], dtype: Any) -> np.ndarray:
        if key not in self.arrays:
            self.arrays[key] = np.lib.format.open_memmap(self.folder / file, mode="w+", dtype=dtype,
                                                         shape=(self.num_samples, *shape))
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


def _label_dtype(ignore_index: int, num_classes: int | None) -> Any:
    largest = max(ignore_index, (num_classes or 0) - 1)
    return np.uint8 if 0 <= ignore_index and largest <= 255 else np.int16


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(cache_dir: Path, key: str) -> None:
    for partial in cache_dir.glob(f".partial-{key}-*"):
        try:
            pid = int(partial.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(partial, ignore_errors=True)


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished ``staging`` folder to ``final`` (keeping a complete cache another
    process published first)."""
    try:
        os.rename(staging, final)
    except OSError:
        try:
            FeatureCache.open(final)
        except DataError:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)
            return
        shutil.rmtree(staging, ignore_errors=True)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def default_num_workers(device: torch.device) -> int:
    """Loader processes for :func:`extract_features` on ``device``: none on the CPU, where a worker
    only competes with torch's own threads for the same cores (measured on 2 cores, ViT-S/16 at
    224 px, bf16: 37.9 images/s with one worker against 54.6 without, the bare forward 61.9);
    up to 4 on CUDA, where loading overlaps with GPU compute."""
    if device.type == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 1) - 1))


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    precision: str = "bf16",
    device: str | torch.device = "auto",
    attention_blocks: Sequence[int] = (),
    attention_kinds: Sequence[str] = ("cls",),
    cache_dir: str | Path | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    num_workers: int | None = None,
    labels: bool = True,
    refresh: bool = False,
    prefetch_factor: int = 4,
    progress: bool = False,
) -> FeatureCache:
    """Features of every sample of ``dataset``, from the cache when it holds them.

    Args:
        backbone: a ViT (``forward(images, return_attention=...) -> ViTOutput``) or any module
            mapping images ``[B, 3, H, W]`` in [0, 1] to ``[B, D, h, w]`` (or an object with
            ``patch_tokens``). Put in eval mode for the extraction and moved to ``device``.
        dataset: yields ``{"image": float [3, H, W] in [0, 1], "name": str}`` (+ ``"mask"``).
        batch_size: images per forward.
        precision: ``"bf16"`` (autocast) or ``"fp32"``; part of the key.
        device: ``auto``, ``cpu``, ``cuda`` or a torch device.
        attention_blocks / attention_kinds: attention maps to store (module docstring).
        cache_dir: where caches live (default :func:`default_cache_dir`).
        preprocessing: ``{"resize": N | [H, W], "crop": [H, W]}`` (module docstring).
        num_workers: DataLoader worker processes loading and preprocessing ahead of the
            backbone (0 = load in this process); None = :func:`default_num_workers`.
        labels: store the masks when the dataset has them.
        refresh: ignore (and replace) an existing cache with the same key.
        prefetch_factor: batches each worker prepares ahead.

    Returns:
        The opened :class:`FeatureCache` (``extracted`` says whether the backbone ran).

    Raises:
        DataError: a sample whose preprocessed size differs from the first one's (naming both),
            a name that changed between the key computation and the extraction.
        ConfigError: bad preprocessing, attention block or kind, precision or device.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    for kind in attention_kinds:
        if kind not in ATTENTION_KINDS:
            raise ConfigError(f"attention_kinds: unknown kind {kind!r} (valid: {list(ATTENTION_KINDS)})")
    torch_device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if num_workers is None:
        num_workers = default_num_workers(torch_device)
    prep = normalise_preprocessing(preprocessing)
    blocks = _attention_blocks(backbone, attention_blocks)
    kinds = sorted(set(attention_kinds)) if blocks else []
    names = dataset_names(dataset)
    if not names:
        raise DataError("extract_features: the dataset is empty")
    key, description = cache_key(backbone, dataset, prep, precision=precision, attention_blocks=blocks,
                                 attention_kinds=kinds, labels=labels, names=names)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / key
    if final.is_dir() and not refresh:
        try:
            return FeatureCache.open(final)
        except DataError:
            pass  # unreadable: extract again and replace it
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, key)
    staging = root / f".partial-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        manifest = _extract_into(staging, backbone, dataset, names, prep, description, key, blocks, kinds,
                                 batch_size, precision, torch_device, num_workers, labels, prefetch_factor,
                                 progress)
        atomic_write_json(staging / MANIFEST, manifest)
        _publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    cache = FeatureCache.open(final)
    cache.extracted = True
    return cache


def _extract_into(staging: Path, backbone: nn.Module, dataset: Dataset, names: list[str], prep: dict[str, Any],
                  description: dict[str, Any], key: str, blocks: list[int], kinds: list[str], batch_size: int,
                  precision: str, device: torch.device, num_workers: int, with_labels: bool,
                  prefetch_factor: int, progress: bool) -> dict[str, Any]:
    """Run the backbone over ``dataset`` writing arrays into ``staging``; returns the manifest."""
    start_time = time.perf_counter()
    class_map = getattr(dataset, "class_map", None)
    if class_map is None and isinstance(dataset, Subset):
        class_map = getattr(dataset.dataset, "class_map", None)
    ignore_index = int(getattr(class_map, "ignore_index", 255))
    num_classes = getattr(class_map, "num_classes", None)
    loader = DataLoader(
        _Prepared(dataset, prep, with_labels), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda",
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    writer = _CacheWriter(staging, len(names))
    was_training = backbone.training
    backbone.eval()
    backbone.to(device)
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    stride = getattr(backbone, "patch_size", None)
    image_size: tuple[int, int] | None = None
    first_name = names[0]
    feature_shape: list[int] = []
    has_labels = False
    position = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), desc="features", dynamic_ncols=True)
    try:
        for batch in loader:
            if "mismatch" in batch:
                name, size, other, other_size = batch["mismatch"]
                raise DataError(_size_message(name, size, other, other_size))
            size = tuple(batch["image"].shape[-2:])
            if image_size is None:
                image_size = size  # type: ignore[assignment]
            elif size != image_size:
                raise DataError(_size_message(batch["name"][0], size, first_name, image_size))
            for offset, name in enumerate(batch["name"]):
                if name != names[position + offset]:
                    raise DataError(f"sample {position + offset} is named {name!r}, expected "
                                    f"{names[position + offset]!r} (the dataset changed during extraction?)")
            images = batch["image"].to(device, non_blocking=True)
            with autocast(device, precision):
                output = backbone(images, return_attention=blocks) if blocks else backbone(images)
            features = _patch_tokens(output).float()
            feature_shape = list(features.shape[1:])
            count = features.shape[0]
            writer.write("features", "features.npy", position, features.cpu().numpy(), np.float16)
            if (batch["mask"] is not None) != has_labels and position > 0:
                raise DataError(f"sample {batch['name'][0]!r} {'has' if not has_labels else 'lacks'} a mask but "
                                f"{first_name!r} {'does not' if not has_labels else 'does'}; pass labels=False to "
                                "cache features only")
            if batch["mask"] is not None:
                has_labels = True
                dtype = _label_dtype(ignore_index, num_classes)
                writer.write("labels", "labels.npy", position, batch["mask"].numpy().astype(dtype), dtype)
            if blocks:
                attentions = getattr(output, "attentions", None)
                grid = (int(features.shape[2]), int(features.shape[3]))
                for block in blocks:
                    if attentions is None or block not in attentions:
                        raise ConfigError(f"attention_blocks: the backbone returned no attention for block {block}")
                    for kind in kinds:
                        reduced = _reduce_attention(attentions[block], kind, prefix, grid)
                        writer.write(f"{kind}@{block}", f"attention_{kind}_{block}.npy", position,
                                     reduced.cpu().numpy(), np.float16)
            position += count
            if bar is not None:
                bar.update(count)
    finally:
        backbone.train(was_training)
        if bar is not None:
            bar.close()
    if position != len(names):
        raise DataError(f"extract_features: the loader yielded {position} samples, the dataset has {len(names)}")
    files = dict(writer.files)
    shapes = {key_: [len(names), *writer.arrays[key_].shape[1:]] for key_ in writer.arrays}
    writer.flush()
    assert image_size is not None
    return {
        "format": FORMAT,
        "key": key,
        "complete": True,
        "labelwise_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "extract_seconds": round(time.perf_counter() - start_time, 3),
        "num_samples": len(names),
        "image_size": list(image_size),
        "stride": int(stride) if isinstance(stride, int) else None,
        "features": {"file": "features.npy", "shape": [len(names), *feature_shape], "dtype": "float16"},
        "labels": ({"file": "labels.npy", "shape": shapes["labels"], "dtype": str(np.dtype(_label_dtype(ignore_index, num_classes))),
                    "resolution": "image", "ignore_index": ignore_index, "num_classes": num_classes,
                    "class_names": list(getattr(class_map, "names", [])) or None} if has_labels else None),
        "attention": {k: {"file": files[k], "shape": shapes[k], "dtype": "float16"}
                      for k in files if k not in ("features", "labels")},
        "names": names,
        "description": description,
    }


def _size_message(name: str, size: Iterable[int], other: str, other_size: Iterable[int]) -> str:
    h, w = size
    oh, ow = other_size
    return (f"sample {name!r} is {h}x{w} (HxW) after preprocessing but {other!r} is {oh}x{ow}; a feature cache "
            "needs one image size: add preprocessing={'resize': [H, W]} (or 'crop')")


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
        writer = _CacheWriter(staging, len(names))
        writer.write("features", "features.npy", 0, features_np.astype(np.float16), np.float16)
        manifest_labels = None
        if labels_np is not None:
            dtype = _label_dtype(ignore_index, num_classes)
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
