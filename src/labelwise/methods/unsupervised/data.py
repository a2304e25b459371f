"""Training views for unsupervised heads: five-crop and whole-image datasets at a fixed size
(so their backbone features fit one feature cache), and a photometrically jittered copy for
HP's consistency term.

Every wrapper yields ``{"image": float [3, S, S'] in [0, 1], "name": str}`` (+ ``"mask"`` long
``[S, S']`` when the source has masks, resized nearest at pixel centres) and exposes ``names``
and plain attributes, so :func:`labelwise.features.cache.extract_features` keys and names
them without reading pixels. ``TileWindows`` / ``window_starts`` (large images window by window)
live in :mod:`labelwise.data.windows` and are re-exported here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from labelwise.data.identity import dataset_identity, dataset_names
from labelwise.data.transforms import AugmentConfig, PairedAugment
from labelwise.data.windows import TileWindows, window_starts  # noqa: F401 - re-exported
from labelwise.errors import ConfigError
from labelwise.features.preprocess import preprocess

__all__ = ["FIVE_CROPS", "FiveCropDataset", "PhotometricCopy", "ResizedDataset", "TileWindows", "five_crop_boxes",
           "window_starts"]

FIVE_CROPS = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")


def _size(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = (int(v) for v in value)
    return height, width


def five_crop_boxes(height: int, width: int, ratio: float) -> list[tuple[int, int, int, int]]:
    """``(top, left, crop_h, crop_w)`` of the four corner crops and the centre crop whose sides
    are ``ratio`` times the image's (order: :data:`FIVE_CROPS`)."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"crop_ratio: must be in (0, 1], got {ratio}")
    crop_h, crop_w = max(1, round(height * ratio)), max(1, round(width * ratio))
    bottom, right = height - crop_h, width - crop_w
    return [(0, 0, crop_h, crop_w), (0, right, crop_h, crop_w), (bottom, 0, crop_h, crop_w),
            (bottom, right, crop_h, crop_w), (bottom // 2, right // 2, crop_h, crop_w)]


class ResizedDataset(Dataset):
    """Whole images of ``dataset`` resized to ``size`` (bilinear, antialiased; masks nearest)."""

    def __init__(self, dataset: Dataset, size: int | Sequence[int]) -> None:
        self.dataset = dataset
        self.size = _size(size)
        self.source = type(dataset).__qualname__
        self.names = dataset_names(dataset)

    def __len__(self) -> int:
        return len(self.names)

    def cache_identity(self) -> dict[str, Any]:
        return {"resized": list(self.size), "of": dataset_identity(self.dataset)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        image, mask = preprocess(sample["image"].float(), sample.get("mask"), {"resize": list(self.size)},
                                 self.names[index])
        out: dict[str, Any] = {"image": image, "name": self.names[index]}
        if mask is not None:
            out["mask"] = mask
        return out


class FiveCropDataset(Dataset):
    """Five crops per image (:func:`five_crop_boxes`), each resized to ``size``.

    Sample ``5 * i + k`` is crop ``k`` of image ``i``, named ``"<name>@<crop>"``.
    """

    def __init__(self, dataset: Dataset, size: int | Sequence[int] = 224, crop_ratio: float = 0.5) -> None:
        if not 0 < crop_ratio <= 1:
            raise ConfigError(f"crop_ratio: must be in (0, 1], got {crop_ratio}")
        self.dataset = dataset
        self.size = _size(size)
        self.crop_ratio = float(crop_ratio)
        self.source_names = dataset_names(dataset)
        self.names = [f"{name}@{crop}" for name in self.source_names for crop in FIVE_CROPS]

    def __len__(self) -> int:
        return len(self.names)

    def cache_identity(self) -> dict[str, Any]:
        return {"five_crop": list(self.size), "ratio": repr(self.crop_ratio), "of": dataset_identity(self.dataset)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, crop = divmod(index, len(FIVE_CROPS))
        sample = self.dataset[source]
        image: Tensor = sample["image"].float()
        mask: Tensor | None = sample.get("mask")
        top, left, crop_h, crop_w = five_crop_boxes(image.shape[1], image.shape[2], self.crop_ratio)[crop]
        image = image[:, top:top + crop_h, left:left + crop_w]
        if mask is not None:
            mask = mask[top:top + crop_h, left:left + crop_w]
        image, mask = preprocess(image, mask, {"resize": list(self.size)}, self.names[index])
        out: dict[str, Any] = {"image": image, "name": self.names[index]}
        if mask is not None:
            out["mask"] = mask
        return out


class PhotometricCopy(Dataset):
    """``dataset`` with a color jitter drawn from ``(seed, index)`` (the same every epoch, so its
    features can be cached): brightness, contrast, saturation factors in ``[1-v, 1+v]`` and a hue
    shift, the photometric part of :class:`labelwise.data.transforms.PairedAugment`. Geometry is
    untouched, so patch ``(y, x)`` of the copy shows the same place as in the original."""

    def __init__(self, dataset: Dataset, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3,
                 hue: float = 0.1, seed: int = 0) -> None:
        self.dataset = dataset
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.seed = seed
        self.names = dataset_names(dataset)
        self._augment = PairedAugment(AugmentConfig(hflip=0.0, brightness=brightness, contrast=contrast,
                                                    saturation=saturation, hue=hue))

    def __len__(self) -> int:
        return len(self.names)

    def cache_identity(self) -> dict[str, Any]:
        return {"photometric": [repr(self.brightness), repr(self.contrast), repr(self.saturation), repr(self.hue)],
                "seed": self.seed, "of": dataset_identity(self.dataset)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        state = np.random.SeedSequence([self.seed, index]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        sample["image"] = self._augment.photometric(sample["image"][None].float(), generator)[0]
        return sample
