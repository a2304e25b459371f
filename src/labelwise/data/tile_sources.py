"""Whole tiles assembled from other tile sets, for training on crops of them.

- :class:`RelabeledTiles`: the images of a tile set with masks held in memory (pseudo-labels
  made by a model); the tile set's own masks are never returned.
- :class:`TileUnion`: several tile sets as one, so that one
  :class:`~labelwise.data.RandomCropDataset` draws crops from all of them (area-weighted, so a
  set listed twice is drawn twice as often).

Both are :class:`~labelwise.data.folder.PairSource` s with ``names``, ``image_size(i)``,
``load_mask(i)`` and whole-tile samples, like :class:`~labelwise.data.AerialTiles`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from labelwise.data.base import SegmentationDataset
from labelwise.data.folder import Pair, PairSource, to_sample
from labelwise.data.splits import dataset_names
from labelwise.errors import DataError

__all__ = ["RelabeledTiles", "TileUnion"]


def _size(source: PairSource, index: int) -> tuple[int, int]:
    sizer = getattr(source, "image_size", None)
    if callable(sizer):
        return tuple(sizer(index))  # type: ignore[return-value]
    return tuple(source.load_pair(index)[0].shape[:2])  # type: ignore[return-value]


class RelabeledTiles(SegmentationDataset):
    """The tiles of ``source`` with ``masks[i]`` (``[H, W]`` integer, tile ``i``'s size) as labels.

    Raises:
        DataError: a count or size mismatch, naming the tile.
    """

    def __init__(self, source: PairSource, masks: Sequence[np.ndarray]) -> None:
        if len(masks) != len(source.pairs):
            raise DataError(f"RelabeledTiles: {len(masks)} masks for {len(source.pairs)} tiles")
        self.source = source
        self.pairs: list[Pair] = list(source.pairs)
        self.class_map = source.class_map
        self.names = dataset_names(source)
        self.masks = list(masks)
        for index, mask in enumerate(self.masks):
            if tuple(mask.shape) != _size(source, index):
                raise DataError(f"{self.pairs[index][0]}: mask of {mask.shape[1]}x{mask.shape[0]} px for a tile of "
                                f"{_size(source, index)[1]}x{_size(source, index)[0]} px")

    def __len__(self) -> int:
        return len(self.masks)

    def image_size(self, index: int) -> tuple[int, int]:
        return tuple(self.masks[index].shape)  # type: ignore[return-value]

    def load_mask(self, index: int) -> np.ndarray:
        return self.masks[index].astype(np.int64)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, _ = self.source.load_pair(index)
        return image, self.load_mask(index)

    def __getitem__(self, index: int):  # type: ignore[override]
        image, mask = self.load_pair(index)
        return to_sample(image, mask, self.names[index])


class TileUnion(SegmentationDataset):
    """The tiles of every source in ``sources``, in order, as one tile set (names kept).

    Raises:
        DataError: no sources, or sources with different class maps.
    """

    def __init__(self, sources: Sequence[PairSource]) -> None:
        if not sources:
            raise DataError("TileUnion: no tile sets given")
        self.class_map = sources[0].class_map
        for source in sources[1:]:
            if source.class_map.names != self.class_map.names:
                raise DataError(f"TileUnion: class maps differ: {list(self.class_map.names)} and "
                                f"{list(source.class_map.names)}")
        self.sources = list(sources)
        self.index = [(s, i) for s, source in enumerate(self.sources) for i in range(len(source.pairs))]
        self.pairs: list[Pair] = [self.sources[s].pairs[i] for s, i in self.index]
        self.names = [dataset_names(self.sources[s])[i] for s, i in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def image_size(self, index: int) -> tuple[int, int]:
        s, i = self.index[index]
        return _size(self.sources[s], i)

    def load_mask(self, index: int) -> np.ndarray:
        s, i = self.index[index]
        loader = getattr(self.sources[s], "load_mask", None)
        return loader(i) if callable(loader) else self.sources[s].load_pair(i)[1]

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        s, i = self.index[index]
        return self.sources[s].load_pair(i)

    def __getitem__(self, index: int):  # type: ignore[override]
        image, mask = self.load_pair(index)
        return to_sample(image, mask, self.names[index])
