"""Large color-coded aerial tiles (ISPRS Potsdam / Vaihingen format, the Dubai aerial set).

* :class:`AerialTiles` lists the whole tiles of ``root/tileN/images/*`` + ``root/tileN/masks/*``
  (or a flat ``root/images`` + ``root/labels|masks``) and yields them whole, for sliding-window
  evaluation.
* :class:`RandomCropDataset` samples random fixed-size crops on the fly from any
  :class:`~labelwise.data.folder.PairSource` (AerialTiles, FolderDataset, ...), decoding tiles
  lazily with a small per-process LRU cache. Crop ``i`` of epoch ``e`` depends only on
  ``(seed, e, i)``, so every DataLoader worker draws the same crop for the same index.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from labelwise.data.base import Sample, SegmentationDataset
from labelwise.data.classmap import ClassMap
from labelwise.data.folder import (
    OnError,
    PairedFilesDataset,
    PairSource,
    Problem,
    coerce_class_map,
    discover_pairs,
    to_sample,
)
from labelwise.data.io import image_size
from labelwise.errors import DataError


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_tile_folders(root: Path) -> list[str]:
    """Names of the sub-folders of ``root`` that hold an ``images`` folder, in natural order."""
    return sorted((p.name for p in root.iterdir() if (p / "images").is_dir()), key=_natural_key)


class AerialTiles(PairedFilesDataset):
    """Whole color-coded tiles of several tile folders.

    Args:
        root: folder with ``tile1/``, ``tile2/``, ... each holding ``images/`` and ``masks/``
            (or ``labels/``), and ``classes.json``; a folder that itself holds ``images/`` is
            read as a single tile folder.
        tiles: tile folders to use: ints ``n`` (folder ``tile<n>``) or folder names; ``None``
            for all of them.
        class_map: a ClassMap or path to a ``classes.json``; ``None`` for ``root/classes.json``.
        resize: optional ``(H, W)`` (rarely wanted for tiles).
        on_error: ``"raise"`` or ``"skip"`` (see :class:`~labelwise.data.folder.FolderDataset`).

    ``pairs`` is the list of (image path, mask path); sample names are ``"<tile>_<stem>"``.
    Items are whole tiles: image float32 ``[3, H, W]`` in [0, 1], mask int64 ``[H, W]``.
    """

    def __init__(
        self,
        root: str | Path,
        tiles: Sequence[int | str] | None = None,
        class_map: ClassMap | str | Path | None = None,
        resize: tuple[int, int] | None = None,
        on_error: OnError = "raise",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: aerial dataset folder not found")
        folders = self._tile_folders(tiles)
        pairs: list[tuple[Path, Path]] = []
        names: list[str] = []
        problems: list[Problem] = []
        for folder in folders:
            found, trouble = discover_pairs(folder)
            pairs += found
            problems += trouble
            prefix = "" if folder == self.root else f"{folder.name}_"
            names += [f"{prefix}{image.stem}" for image, _ in found]
        self.tiles = [f.name for f in folders]
        self._setup(pairs, problems, coerce_class_map(class_map, self.root), resize, on_error, str(self.root), names)

    def _tile_folders(self, tiles: Sequence[int | str] | None) -> list[Path]:
        if tiles is None:
            if (self.root / "images").is_dir():
                return [self.root]
            names = list_tile_folders(self.root)
            if not names:
                raise DataError(f"{self.root}: no tile folders (sub-folders with an images/ folder)")
            return [self.root / n for n in names]
        if isinstance(tiles, (str, int)):
            tiles = [tiles]
        folders = []
        for tile in tiles:
            name = f"tile{tile}" if isinstance(tile, int) else str(tile)
            folder = self.root / name
            if not (folder / "images").is_dir():
                raise DataError(
                    f"{folder}: tile folder {name!r} not found or has no images/; available: {list_tile_folders(self.root)}"
                )
            folders.append(folder)
        if not folders:
            raise DataError(f"{self.root}: empty list of tiles")
        return folders


def _compact_mask(mask: np.ndarray, class_map: ClassMap) -> np.ndarray:
    """Store a label mask in the smallest dtype that holds every value (for the tile cache)."""
    top = max(class_map.num_classes - 1, class_map.ignore_index)
    if class_map.ignore_index >= 0 and top < 256:
        return mask.astype(np.uint8)
    if class_map.ignore_index >= -32768 and top < 32768:
        return mask.astype(np.int16)
    return mask


def _pair_crop(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        crop = (size, size)
    else:
        crop = tuple(int(s) for s in size)  # type: ignore[assignment]
    if len(crop) != 2 or min(crop) <= 0:
        raise DataError(f"RandomCropDataset: crop_size must be a positive int or (H, W), got {size!r}")
    return crop  # type: ignore[return-value]


class RandomCropDataset(SegmentationDataset):
    """Random ``crop_size`` crops drawn on the fly from the pairs of ``source``.

    Args:
        source: a :class:`~labelwise.data.folder.PairSource` (``pairs``, ``class_map``,
            ``load_pair(i)``), e.g. :class:`AerialTiles` or a FolderDataset.
        crop_size: ``S`` or ``(H, W)`` in pixels.
        samples_per_epoch: the dataset length (crops per epoch).
        seed: base seed; crop ``i`` of epoch ``e`` uses ``np.random.default_rng([seed, e, i])``.
        cache_megabytes: memory budget of the per-process LRU cache of decoded tiles (a
            6000x6000 tile takes about 140 MB with its mask). The default holds every tile of a
            small set such as the Dubai tiles (~330 MB), so each tile is decoded once per worker.
        crops_per_tile: consecutive indices ``i // crops_per_tile`` share their tile (drawn
            with ``default_rng([seed, e, i // crops_per_tile, crops_per_tile])``) so that the
            cache hits when a loader reads indices in order; 1 (default) draws a tile per crop.

    The tile is chosen with probability proportional to its area; the crop position uniformly.
    Tiles smaller than the crop are placed at a random offset and padded (image 0, mask
    ``ignore_index``). Names are ``"<stem>@<y>_<x>"`` with the crop's top-left corner in tile
    pixels (negative when padded). Items: image float32 ``[3, h, w]`` in [0, 1], mask int64.
    """

    def __init__(
        self,
        source: PairSource,
        crop_size: int | Sequence[int],
        samples_per_epoch: int,
        seed: int = 0,
        cache_megabytes: float = 1024.0,
        crops_per_tile: int = 1,
    ) -> None:
        if not isinstance(source, PairSource):
            raise DataError(f"RandomCropDataset: source {source!r} lacks pairs / class_map / load_pair")
        if samples_per_epoch <= 0:
            raise DataError(f"RandomCropDataset: samples_per_epoch must be positive, got {samples_per_epoch}")
        if crops_per_tile <= 0 or cache_megabytes <= 0:
            raise DataError("RandomCropDataset: crops_per_tile and cache_megabytes must be positive")
        if not source.pairs:
            raise DataError("RandomCropDataset: the source has no pairs")
        self.source = source
        self.class_map = source.class_map
        self.crop_size = _pair_crop(crop_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.cache_bytes = int(cache_megabytes * 2**20)
        self.crops_per_tile = int(crops_per_tile)
        self.epoch = 0
        self.sizes = [self._source_size(i) for i in range(len(source.pairs))]
        areas = np.asarray([h * w for h, w in self.sizes], dtype=np.float64)
        self.probabilities = areas / areas.sum()
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _source_size(self, index: int) -> tuple[int, int]:
        sizer = getattr(self.source, "image_size", None)
        if callable(sizer):
            return tuple(sizer(index))  # type: ignore[return-value]
        return image_size(self.source.pairs[index][0])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # each worker process decodes its own tiles
        return state

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of epoch ``epoch`` (call before iterating; every worker agrees)."""
        self.epoch = int(epoch)

    def crop_params(self, index: int) -> tuple[int, int, int]:
        """``(tile index, y, x)`` of crop ``index`` in the current epoch; ``y, x`` is the crop's
        top-left corner in tile pixels (negative where the tile is padded)."""
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"RandomCropDataset: index {index} out of range for {self.samples_per_epoch} crops")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.crops_per_tile == 1:
            tile = int(rng.choice(len(self.sizes), p=self.probabilities))
        else:
            block_rng = np.random.default_rng([self.seed, self.epoch, index // self.crops_per_tile, self.crops_per_tile])
            tile = int(block_rng.choice(len(self.sizes), p=self.probabilities))
        height, width = self.sizes[tile]
        crop_h, crop_w = self.crop_size
        y = _offset(rng, height, crop_h)
        x = _offset(rng, width, crop_w)
        return tile, y, x

    def _tile(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        image, mask = self.source.load_pair(index)
        if image.shape[:2] != tuple(self.sizes[index]):
            raise DataError(
                f"{self.source.pairs[index][0]}: decoded size {image.shape[1]}x{image.shape[0]} differs from "
                f"the header size {self.sizes[index][1]}x{self.sizes[index][0]}"
            )
        entry = (image, _compact_mask(mask, self.class_map))
        self._cache[index] = entry
        while len(self._cache) > 1 and self.cached_bytes > self.cache_bytes:
            self._cache.popitem(last=False)
        return entry

    @property
    def cached_bytes(self) -> int:
        """Bytes held by the tile cache of this process."""
        return sum(image.nbytes + mask.nbytes for image, mask in self._cache.values())

    def crop(self, tile: int, y: int, x: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The window of ``size`` (default ``crop_size``) of tile ``tile`` with top-left ``(y, x)``:
        (uint8 ``[h, w, C]``, int64 ``[h, w]``); outside the tile the image is 0 and the mask
        ``ignore_index``."""
        image, mask = self._tile(tile)
        crop_h, crop_w = size or self.crop_size
        out_image = np.zeros((crop_h, crop_w, image.shape[2]), dtype=np.uint8)
        out_mask = np.full((crop_h, crop_w), self.class_map.ignore_index, dtype=np.int64)
        height, width = mask.shape
        y0, y1 = max(y, 0), min(y + crop_h, height)
        x0, x1 = max(x, 0), min(x + crop_w, width)
        if y1 > y0 and x1 > x0:
            out_image[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
            out_mask[y0 - y : y1 - y, x0 - x : x1 - x] = mask[y0:y1, x0:x1]
        return out_image, out_mask

    def inside(self, index: int) -> np.ndarray:
        """bool ``[h, w]`` of crop ``index``: True on tile pixels, False on the padding. Computed
        from the crop's position alone, so it can mark the real pixels of images whose masks must
        not be read (the unlabeled part of a semi-supervised run)."""
        tile, y, x = self.crop_params(index)
        height, width = self.sizes[tile]
        crop_h, crop_w = self.crop_size
        rows = np.arange(y, y + crop_h)
        cols = np.arange(x, x + crop_w)
        return ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]

    def __getitem__(self, index: int) -> Sample:
        tile, y, x = self.crop_params(index)
        image, mask = self.crop(tile, y, x)
        names = getattr(self.source, "names", None)
        stem = names[tile] if names is not None else self.source.pairs[tile][0].stem
        return to_sample(image, mask, f"{stem}@{y}_{x}")

    def __repr__(self) -> str:
        return (
            f"RandomCropDataset({len(self.sizes)} tiles, crop {self.crop_size[0]}x{self.crop_size[1]}, "
            f"{self.samples_per_epoch} per epoch, seed {self.seed})"
        )


def _offset(rng: np.random.Generator, extent: int, crop: int) -> int:
    """Top-left coordinate of a crop of length ``crop`` in ``extent`` pixels: uniform inside
    when the tile is large enough, else minus a uniform padding offset."""
    if extent >= crop:
        return int(rng.integers(0, extent - crop + 1))
    return -int(rng.integers(0, crop - extent + 1))
