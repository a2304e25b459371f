"""Large images window by window: every labeled pixel exactly once, in windows of one fixed
size (used by the unsupervised heads' feature caches and by weak supervision's pseudo-masks of
aerial tiles)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from labelwise.data.identity import dataset_identity, dataset_names

__all__ = ["TileWindows", "window_starts"]


def window_starts(extent: int, window: int) -> list[tuple[int, int, int]]:
    """``(start, own_from, own_to)`` of windows of ``window`` pixels covering ``[0, extent)``:
    starts ``0, window, 2 window, ...`` and a last one flush with the end; each pixel is *owned*
    by exactly one window (the first that covers it). An extent below ``window`` gives one
    window at 0 owning ``[0, extent)`` (the rest is padding)."""
    if extent <= window:
        return [(0, 0, extent)]
    starts = list(range(0, extent - window + 1, window))
    if starts[-1] + window < extent:
        starts.append(extent - window)
    out, covered = [], 0
    for start in starts:
        out.append((start, max(start, covered), start + window))
        covered = start + window
    return out


class TileWindows(Dataset):
    """Every labeled pixel of large images exactly once, in windows of one fixed size (so their
    features fit one cache): windows of ``window`` pixels on a grid with the last row / column
    flush with the image end, pixels owned by an earlier window set to ``ignore_index`` in the
    later one's mask, images smaller than the window padded (padding ignored). Sample names:
    ``"<name>@<y>_<x>"``."""

    def __init__(self, dataset: Dataset, window: int = 512, ignore_index: int = 255) -> None:
        self.dataset = dataset
        self.window = int(window)
        self.ignore_index = int(ignore_index)
        self.class_map = getattr(dataset, "class_map", None)
        self.windows: list[tuple[int, int, int, int, int, int, int]] = []
        self._cached: tuple[int, dict[str, Any]] | None = None
        names = dataset_names(dataset)
        self.names = []
        for index in range(len(names)):
            height, width = self._size(index)
            for y, y_from, y_to in window_starts(height, self.window):
                for x, x_from, x_to in window_starts(width, self.window):
                    self.windows.append((index, y, x, y_from - y, min(y_to, height) - y, x_from - x,
                                         min(x_to, width) - x))
                    self.names.append(f"{names[index]}@{y}_{x}")

    def _size(self, index: int) -> tuple[int, int]:
        size = getattr(self.dataset, "image_size", None)
        if callable(size):
            return tuple(size(index))  # type: ignore[return-value]
        image = self._load(index)["image"]
        return int(image.shape[1]), int(image.shape[2])

    def _load(self, index: int) -> dict[str, Any]:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, self.dataset[index])
        return self._cached[1]

    def __len__(self) -> int:
        return len(self.windows)

    def cache_identity(self) -> dict[str, Any]:
        return {"tile_windows": self.window, "of": dataset_identity(self.dataset)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, y, x, own_y0, own_y1, own_x0, own_x1 = self.windows[index]
        sample = self._load(source)
        size = self.window
        image = sample["image"][:, y:y + size, x:x + size].float()
        pad_h, pad_w = size - image.shape[1], size - image.shape[2]
        image = F.pad(image, (0, pad_w, 0, pad_h))
        out: dict[str, Any] = {"image": image, "name": self.names[index]}
        if sample.get("mask") is not None:
            mask = torch.full((size, size), self.ignore_index, dtype=torch.long)
            crop = sample["mask"][y:y + size, x:x + size].long()
            owned = torch.full_like(crop, self.ignore_index)
            owned[own_y0:own_y1, own_x0:own_x1] = crop[own_y0:own_y1, own_x0:own_x1]
            mask[:crop.shape[0], :crop.shape[1]] = owned
            out["mask"] = mask
        return out

