"""Preprocessing of samples for a feature cache: validated ``resize`` / ``crop`` settings, the
per-sample transform, and the loader-side dataset and collate that report size mismatches.

``preprocessing`` may hold ``resize`` (``N`` or ``[H, W]``: bilinear, antialiased; masks nearest
at pixel centres) and ``crop`` (``[H, W]``: centre crop after resizing).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from labelwise.errors import ConfigError, DataError

__all__ = ["PREPROCESSING_KEYS", "normalise_preprocessing", "preprocess"]

PREPROCESSING_KEYS = ("resize", "crop")


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


class Prepared(Dataset):
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


def collate_prepared(samples: list[dict[str, Any]]) -> dict[str, Any]:
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


def size_message(name: str, size: Iterable[int], other: str, other_size: Iterable[int]) -> str:
    h, w = size
    oh, ow = other_size
    return (f"sample {name!r} is {h}x{w} (HxW) after preprocessing but {other!r} is {oh}x{ow}; a feature cache "
            "needs one image size: add preprocessing={'resize': [H, W]} (or 'crop')")
