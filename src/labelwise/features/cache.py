"""Frozen-backbone features of a whole dataset, streamed once into a memory-mapped cache.

``extract_features(backbone, dataset, preprocessing={...})`` runs the backbone over every sample
(batched, bf16 autocast where allowed, data loading overlapped with compute by DataLoader
worker processes with a deep prefetch queue and pinned memory on CUDA) and writes::

    <cache_dir>/<key>/manifest.json          what is stored, shapes, names, how it was made
                     /features.npy           float16 [N, D, h, w] patch features (``storage``)
                     /labels.npy             uint8 (int16 when needed) [N, H, W] masks, optional
                     /attention_<kind>_<block>.npy   attention maps asked for, float16 (``storage``)

``storage="float16"`` (default) halves the disk and page-cache footprint at a relative rounding of
about 5e-4; ``"float32"`` stores the backbone's output bit for bit, so a method trained from the
cache sees exactly what it would compute on the fly.

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
  first if a method needs it);
- ``"local_positive"``: the neighbour weights of HP's local hidden positives, ``[N, 9, h, w]``
  in the ``"neighbourhood"`` layout, from rows processed as
  :func:`~labelwise.features.attention.local_positive_weights` describes.

Modules: ``feature_preprocess`` (resize / crop), ``feature_key`` (the cache key),
``feature_attention`` (attention reductions), ``feature_store`` (:class:`FeatureCache`, the
writer, :func:`write_feature_cache`); this one runs the extraction.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from labelwise import __version__
from labelwise.engine.runtime import autocast, resolve_device
from labelwise.errors import ConfigError, DataError
from labelwise.features.attention import ATTENTION_KINDS, neighbourhood_attention, patch_tokens, reduce_attention
from labelwise.features.key import FORMAT, attention_block_indices, cache_key, dataset_names, weights_digest
from labelwise.features.preprocess import (
    PREPROCESSING_KEYS,
    Prepared,
    collate_prepared,
    normalise_preprocessing,
    preprocess,
    size_message,
)
from labelwise.features.store import (
    MANIFEST,
    CacheWriter,
    FeatureCache,
    FeatureDataset,
    grid_size,
    label_dtype,
    write_feature_cache,
)
from labelwise.io.atomic import atomic_write_json

__all__ = [
    "ATTENTION_KINDS",
    "FORMAT",
    "MANIFEST",
    "PREPROCESSING_KEYS",
    "FeatureCache",
    "FeatureDataset",
    "cache_key",
    "dataset_names",
    "default_cache_dir",
    "default_num_workers",
    "extract_features",
    "grid_size",
    "neighbourhood_attention",
    "normalise_preprocessing",
    "preprocess",
    "weights_digest",
    "write_feature_cache",
]


def default_cache_dir() -> Path:
    """``$LABELWISE_CACHE/features`` when the variable is set, else ``~/.cache/labelwise/features``."""
    root = os.environ.get("LABELWISE_CACHE")
    return Path(root).expanduser() / "features" if root else Path.home() / ".cache" / "labelwise" / "features"


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
    storage: str = "float16",
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
        storage: ``float16`` or ``float32`` arrays for features and attention (part of the key).

    Returns:
        The opened :class:`FeatureCache` (``extracted`` says whether the backbone ran).

    Raises:
        DataError: a sample whose preprocessed size differs from the first one's (naming both),
            a name that changed between the key computation and the extraction.
        ConfigError: bad preprocessing, attention block or kind, precision or device.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
    if storage not in ("float16", "float32"):
        raise ConfigError(f"storage: must be 'float16' or 'float32', got {storage!r}")
    for kind in attention_kinds:
        if kind not in ATTENTION_KINDS:
            raise ConfigError(f"attention_kinds: unknown kind {kind!r} (valid: {list(ATTENTION_KINDS)})")
    torch_device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if num_workers is None:
        num_workers = default_num_workers(torch_device)
    prep = normalise_preprocessing(preprocessing)
    blocks = attention_block_indices(backbone, attention_blocks)
    kinds = sorted(set(attention_kinds)) if blocks else []
    names = dataset_names(dataset)
    if not names:
        raise DataError("extract_features: the dataset is empty")
    key, description = cache_key(backbone, dataset, prep, precision=precision, attention_blocks=blocks,
                                 attention_kinds=kinds, labels=labels, names=names, storage=storage)
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
                                 progress, np.dtype(storage))
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
                  prefetch_factor: int, progress: bool, storage: np.dtype = np.dtype(np.float16)) -> dict[str, Any]:
    """Run the backbone over ``dataset`` writing arrays into ``staging``; returns the manifest."""
    start_time = time.perf_counter()
    class_map = getattr(dataset, "class_map", None)
    if class_map is None and isinstance(dataset, Subset):
        class_map = getattr(dataset.dataset, "class_map", None)
    ignore_index = int(getattr(class_map, "ignore_index", 255))
    num_classes = getattr(class_map, "num_classes", None)
    loader = DataLoader(
        Prepared(dataset, prep, with_labels), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_prepared, pin_memory=device.type == "cuda",
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    writer = CacheWriter(staging, len(names))
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
                raise DataError(size_message(name, size, other, other_size))
            size = tuple(batch["image"].shape[-2:])
            if image_size is None:
                image_size = size  # type: ignore[assignment]
            elif size != image_size:
                raise DataError(size_message(batch["name"][0], size, first_name, image_size))
            for offset, name in enumerate(batch["name"]):
                if name != names[position + offset]:
                    raise DataError(f"sample {position + offset} is named {name!r}, expected "
                                    f"{names[position + offset]!r} (the dataset changed during extraction?)")
            images = batch["image"].to(device, non_blocking=True)
            with autocast(device, precision):
                output = backbone(images, return_attention=blocks) if blocks else backbone(images)
            features = patch_tokens(output).float()
            feature_shape = list(features.shape[1:])
            count = features.shape[0]
            writer.write("features", "features.npy", position, features.cpu().numpy(), storage)
            if (batch["mask"] is not None) != has_labels and position > 0:
                raise DataError(f"sample {batch['name'][0]!r} {'has' if not has_labels else 'lacks'} a mask but "
                                f"{first_name!r} {'does not' if not has_labels else 'does'}; pass labels=False to "
                                "cache features only")
            if batch["mask"] is not None:
                has_labels = True
                dtype = label_dtype(ignore_index, num_classes)
                writer.write("labels", "labels.npy", position, batch["mask"].numpy().astype(dtype), dtype)
            if blocks:
                attentions = getattr(output, "attentions", None)
                grid = (int(features.shape[2]), int(features.shape[3]))
                for block in blocks:
                    if attentions is None or block not in attentions:
                        raise ConfigError(f"attention_blocks: the backbone returned no attention for block {block}")
                    for kind in kinds:
                        reduced = reduce_attention(attentions[block], kind, prefix, grid)
                        writer.write(f"{kind}@{block}", f"attention_{kind}_{block}.npy", position,
                                     reduced.cpu().numpy(), storage)
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
        "features": {"file": "features.npy", "shape": [len(names), *feature_shape], "dtype": storage.name},
        "labels": ({"file": "labels.npy", "shape": shapes["labels"], "dtype": str(np.dtype(label_dtype(ignore_index, num_classes))),
                    "resolution": "image", "ignore_index": ignore_index, "num_classes": num_classes,
                    "class_names": list(getattr(class_map, "names", [])) or None} if has_labels else None),
        "attention": {k: {"file": files[k], "shape": shapes[k], "dtype": storage.name}
                      for k in files if k not in ("features", "labels")},
        "names": names,
        "description": description,
    }
