"""Batching samples of different sizes."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from labelwise.data.base import Sample


def pad_collate(samples: Sequence[Sample], ignore_index: int = 255, size_divisor: int = 1) -> dict[str, Any]:
    """Stack samples, padding each at the bottom/right to the largest size in the batch.

    Args:
        samples: Sample dicts (image float ``[3, H_i, W_i]``, mask long ``[H_i, W_i]``, name).
        ignore_index: mask value of the padding.
        size_divisor: round the padded ``H`` and ``W`` up to a multiple of this (e.g. a model's
            output stride).

    Returns:
        ``{"image": float [B, 3, H, W] (padding 0), "mask": long [B, H, W] (padding
        ignore_index), "name": list[str], "sizes": long [B, 2] of the original (H_i, W_i)}``;
        any other keys are passed through as lists. The keys match
        ``torch.utils.data.default_collate`` so either collate feeds the same training loop.
    """
    if not samples:
        raise ValueError("pad_collate: empty batch")
    if size_divisor < 1:
        raise ValueError(f"pad_collate: size_divisor must be >= 1, got {size_divisor}")
    sizes = torch.tensor([tuple(s["image"].shape[-2:]) for s in samples], dtype=torch.long)
    height = _round_up(int(sizes[:, 0].max()), size_divisor)
    width = _round_up(int(sizes[:, 1].max()), size_divisor)
    images, masks = [], []
    for sample in samples:
        image, mask = sample["image"], sample["mask"]
        if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(
                f"pad_collate: sample {sample.get('name', '?')!r} has image {tuple(image.shape)} but mask {tuple(mask.shape)}"
            )
        pad = (0, width - image.shape[-1], 0, height - image.shape[-2])
        images.append(F.pad(image, pad, value=0.0))
        masks.append(F.pad(mask, pad, value=ignore_index))
    batch: dict[str, Any] = {
        "image": torch.stack(images),
        "mask": torch.stack(masks),
        "name": [s.get("name", "") for s in samples],
        "sizes": sizes,
    }
    for key in samples[0]:
        if key not in batch:
            batch[key] = [s[key] for s in samples]  # type: ignore[literal-required]
    return batch


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor
