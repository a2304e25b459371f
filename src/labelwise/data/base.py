"""The sample format every labelwise dataset yields, and the dataset base class."""

from __future__ import annotations

from typing import TypedDict

import torch
from torch.utils.data import Dataset

from labelwise.data.classmap import ClassMap


class Sample(TypedDict):
    """One item of a segmentation dataset.

    image: float32 ``[3, H, W]`` with values in [0, 1] (RGB; models normalise internally).
    mask: int64 ``[H, W]`` of class ids, ``class_map.ignore_index`` where unlabeled.
    name: the file stem the sample came from (for tiles: ``"<stem>@<y>_<x>"`` for crops).
    """

    image: torch.Tensor
    mask: torch.Tensor
    name: str


class SegmentationDataset(Dataset):
    """Base class: subclasses set ``class_map`` and implement ``__len__`` / ``__getitem__``.

    Datasets whose samples are random (crops of large tiles) implement ``set_epoch`` so that
    sample ``i`` of epoch ``e`` is the same whichever worker process draws it; that is what makes
    ``--resume`` exact.
    """

    class_map: ClassMap

    @property
    def num_classes(self) -> int:
        return self.class_map.num_classes

    def set_epoch(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Called by the trainer before each epoch; deterministic datasets ignore it."""

    def image_labels(self, index: int) -> torch.Tensor:
        """Image-level labels of sample ``index``: float ``[num_classes]`` multi-hot of the classes
        present in its mask (used by weak supervision). Subclasses may override with a cheaper
        lookup."""
        mask = self[index]["mask"]
        valid = mask[mask != self.class_map.ignore_index]
        labels = torch.zeros(self.num_classes)
        labels[valid.unique()] = 1.0
        return labels
