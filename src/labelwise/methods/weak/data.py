"""Training samples of the weak-supervision classifier: an image resized to a fixed size and its
tags.

:class:`TaggedImages` wraps any dataset yielding ``{"image" [3, H, W], "name"}``: the tags come
from an :class:`~labelwise.data.tags.ImageTags` (a user's tag file, looked up by sample name) or,
for labeled datasets used as benchmarks, from the sample's own ``mask`` with
:func:`~labelwise.data.tags.tags_from_masks` (computed on the sample as drawn, so random crops of
large tiles get the tags of the crop).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from labelwise.data.tags import ImageTags, tags_from_masks
from labelwise.errors import DataError

__all__ = ["TaggedImages"]


class TaggedImages(Dataset):
    """Items ``{"image": float [3, *size] in [0, 1], "tags": float [K] (0/1), "name": str}``
    (+ the source's ``"mask"`` when ``size`` is None and it has one).

    Args:
        source: the images (and masks, when ``tags`` is None).
        num_classes: ``K``.
        size: ``(H, W)`` every image is resized to (bilinear, antialiased), so batches stack;
            None keeps each image's own size (CAMs and pseudo-masks at full resolution).
        tags: tags by sample name; None derives them from ``mask`` (``min_fraction`` of the
            labeled pixels, ``ignore_index`` excluded).
    """

    def __init__(self, source: Dataset, num_classes: int, size: Sequence[int] | None, tags: ImageTags | None = None,
                 min_fraction: float = 0.01, ignore_index: int = 255) -> None:
        self.source = source
        self.num_classes = num_classes
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.tags = tags
        self.rows = tags.index() if tags is not None else None
        self.min_fraction = min_fraction
        self.ignore_index = ignore_index
        if tags is not None and len(tags.class_names) != num_classes:
            raise DataError(f"the tags name {len(tags.class_names)} classes, the model has {num_classes}")

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.source[index]
        name = str(sample["name"])
        if self.tags is not None:
            assert self.rows is not None
            if name not in self.rows:
                raise DataError(f"image {name!r}: no entry in the tag file")
            present = torch.from_numpy(self.tags.present[self.rows[name]])
        else:
            if "mask" not in sample:
                raise DataError(f"image {name!r}: no mask to derive tags from (give a tag file)")
            present = tags_from_masks(torch.as_tensor(sample["mask"])[None], self.num_classes, self.min_fraction,
                                      self.ignore_index)[0]
        image = sample["image"]
        if self.size is None:
            item = {"image": image, "tags": present.float(), "name": name}
            if "mask" in sample:
                item["mask"] = torch.as_tensor(sample["mask"])
            return item
        if tuple(image.shape[-2:]) != self.size:
            image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False,
                                  antialias=True)[0].clamp_(0, 1)
        return {"image": image, "tags": present.float(), "name": name}
