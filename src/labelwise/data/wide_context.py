"""Windows with their wide context, for wide-context models (:mod:`labelwise.models.wide_context`).

A window's *context* is the region ``context_scale`` times taller and wider, centred on the
window, resized to the window's size. Beyond the tile the context image is 0 and its labels are
``ignore_index`` (never a class). Training samples (:class:`WideContextCrops`) and sliding-window
inference (:func:`context_of_windows`) cut and resize contexts the same way (antialiased
bilinear for images, pixel-centre nearest for labels), so a model sees the same kind of context
in both.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from labelwise.data.aerial import RandomCropDataset
from labelwise.data.base import SegmentationDataset
from labelwise.data.folder import resize_mask, to_sample
from labelwise.data.transforms import PairedAugment, scale_batch, warp_pair
from labelwise.errors import DataError


def context_size(window: Sequence[int], context_scale: float) -> tuple[int, int]:
    """Pixels ``(H, W)`` of the context region of a ``window`` of ``(h, w)`` pixels."""
    return (int(round(window[0] * context_scale)), int(round(window[1] * context_scale)))


def context_origin(y: int, x: int, window: Sequence[int], context_scale: float) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the context region of the window whose top-left is ``(y, x)``."""
    height, width = context_size(window, context_scale)
    return y - (height - int(window[0])) // 2, x - (width - int(window[1])) // 2


def shrink_context(images: Tensor, window: Sequence[int]) -> Tensor:
    """Context regions ``[N, C, H, W]`` resized to the window ``(h, w)`` (antialiased bilinear)."""
    if tuple(images.shape[-2:]) == tuple(window):
        return images
    return F.interpolate(images.float(), size=tuple(int(s) for s in window), mode="bilinear", antialias=True,
                         align_corners=False)


def context_of_windows(padded: Tensor, windows: Sequence[tuple[int, int, int]], window: Sequence[int],
                       context_scale: float, margin: tuple[int, int]) -> Tensor:
    """The contexts ``[N, C, h, w]`` of windows ``(b, y, x)`` of ``padded [B, C, H', W']``, an image
    zero-padded by ``margin = (top/bottom, left/right)`` pixels on every side (window
    coordinates are those of the unpadded image)."""
    height, width = context_size(window, context_scale)
    regions = []
    for b, y, x in windows:
        top, left = context_origin(y, x, window, context_scale)
        top, left = top + margin[0], left + margin[1]
        regions.append(padded[b, :, top: top + height, left: left + width])
    return shrink_context(torch.stack(regions), window)


def context_margin(window: Sequence[int], context_scale: float) -> tuple[int, int]:
    """Zero padding ``(rows, cols)`` every side of an image needs so that every window's context
    region lies inside it."""
    height, width = context_size(window, context_scale)
    return (math.ceil((height - int(window[0])) / 2) + 1, math.ceil((width - int(window[1])) / 2) + 1)


class WideContextCrops(SegmentationDataset):
    """The random crops of ``crops`` with their wide context.

    Items: ``image`` float32 ``[2C, h, w]`` (the crop's channels, then its context's),
    ``mask`` int64 ``[h, w]`` (the crop's labels), ``context_mask`` int64 ``[h, w]`` (the
    context's labels, nearest-resized; ``ignore_index`` beyond the tile), ``name``.
    """

    def __init__(self, crops: RandomCropDataset, context_scale: float) -> None:
        if not isinstance(crops, RandomCropDataset):
            raise DataError(f"WideContextCrops: needs random crops of whole tiles, got {type(crops).__name__}")
        if not context_scale >= 1.0:
            raise DataError(f"WideContextCrops: context_scale must be >= 1, got {context_scale}")
        self.crops = crops
        self.class_map = crops.class_map
        self.context_scale = float(context_scale)

    def __len__(self) -> int:
        return len(self.crops)

    def set_epoch(self, epoch: int) -> None:
        self.crops.set_epoch(epoch)

    def inside(self, index: int) -> np.ndarray:
        """bool ``[h, w]``: True on the window's tile pixels (:meth:`RandomCropDataset.inside`)."""
        return self.crops.inside(index)

    def __getitem__(self, index: int) -> dict:
        tile, y, x = self.crops.crop_params(index)
        image, mask = self.crops.crop(tile, y, x)
        window = self.crops.crop_size
        top, left = context_origin(y, x, window, self.context_scale)
        region, region_mask = self.crops.crop(tile, top, left, size=context_size(window, self.context_scale))
        sample = to_sample(image, mask, "")
        context = torch.from_numpy(np.ascontiguousarray(region.transpose(2, 0, 1))).float().div_(255.0)
        context = shrink_context(context[None], window)[0]
        names = getattr(self.crops.source, "names", None)
        stem = names[tile] if names is not None else self.crops.source.pairs[tile][0].stem
        return {"image": torch.cat([sample["image"], context]), "mask": sample["mask"],
                "context_mask": torch.from_numpy(np.ascontiguousarray(resize_mask(region_mask, window))),
                "name": f"{stem}@{y}_{x}"}

    def __repr__(self) -> str:
        return f"WideContextCrops({self.crops!r}, context_scale {self.context_scale})"


__all__ = ["WideContextCrops", "augment_with_context", "context_margin", "context_matrices", "context_of_windows",
           "context_origin", "context_size", "scale_and_augment_with_context", "shrink_context"]


def context_matrices(local: Tensor, window: Sequence[int], context_scale: float) -> Tensor:
    """The affine maps ``[B, 2, 3]`` that warp each context exactly as ``local`` (input -> output
    pixel ``(x, y)`` maps of the windows, same input and output size) warps its window: with
    window pixel ``p = K c + d`` for context pixel ``c`` (``K`` the context's scale per axis,
    ``d`` its offset), ``q = A p + t`` becomes ``r = K^-1 A K c + K^-1 (A d + t - d)``."""
    height, width = int(window[0]), int(window[1])
    region_h, region_w = context_size(window, context_scale)
    scale = torch.tensor([region_w / width, region_h / height], dtype=local.dtype)
    offset = torch.tensor([scale[0] / 2 - 0.5 - (region_w - width) // 2, scale[1] / 2 - 0.5 - (region_h - height) // 2],
                          dtype=local.dtype)
    linear, shift = local[:, :, :2], local[:, :, 2]
    context_linear = linear * scale[None, None, :] / scale[None, :, None]
    context_shift = ((linear @ offset) + shift - offset) / scale
    return torch.cat([context_linear, context_shift.unsqueeze(-1)], dim=-1)


def augment_with_context(augment: PairedAugment, images: Tensor, masks: Tensor, context_masks: Tensor,
                         context_scale: float, generator: torch.Generator | None = None, photometric: bool = True
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """One draw of ``augment`` applied to windows and, consistently, to their contexts.

    Args:
        images: ``[B, 2C, H, W]`` (window channels, then context channels).
        masks, context_masks: ``[B, H, W]`` labels of the windows and of the contexts.

    Flips (and rotations, scales) turn each context about the same ground point as its window;
    colour jitter draws once per sample for both (``photometric=False``: geometry only, the weak
    view of semi-supervised training). ``augment.config.crop_size`` must be unset (the window is
    the crop).
    """
    cfg = augment.config
    if cfg.crop_size is not None:
        raise DataError("wide-context training: augment.crop_size must be null (the sampled window is the crop)")
    batch, channels, height, width = images.shape
    half = channels // 2
    if not cfg.warps:
        flip_x = (torch.rand(batch, generator=generator) < cfg.hflip).to(images.device)
        flip_y = (torch.rand(batch, generator=generator) < cfg.vflip).to(images.device)
        stacked = torch.cat([masks[:, None], context_masks[:, None]], dim=1)
        images = torch.where(flip_x.view(-1, 1, 1, 1), images.flip(-1), images)
        stacked = torch.where(flip_x.view(-1, 1, 1, 1), stacked.flip(-1), stacked)
        images = torch.where(flip_y.view(-1, 1, 1, 1), images.flip(-2), images)
        stacked = torch.where(flip_y.view(-1, 1, 1, 1), stacked.flip(-2), stacked)
        masks, context_masks = stacked[:, 0], stacked[:, 1]
    else:
        local = augment.sample_matrices(batch, height, width, generator)
        window_images, masks = warp_pair(images[:, :half], masks, local, (height, width), augment.ignore_index)
        context_images, context_masks = warp_pair(images[:, half:], context_masks,
                                                  context_matrices(local, (height, width), context_scale),
                                                  (height, width), augment.ignore_index)
        images = torch.cat([window_images, context_images], dim=1)
    if photometric and cfg.jitters:  # side by side, so that both get the same draws
        jittered = augment.photometric(torch.cat([images[:, :half], images[:, half:]], dim=-1), generator)
        images = torch.cat([jittered[..., :width], jittered[..., width:]], dim=1)
    return images, masks, context_masks


def scale_and_augment_with_context(augment: PairedAugment, images: Tensor, masks: Tensor, context_masks: Tensor,
                                   input_scale: float, context_scale: float,
                                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A training batch of windows with their contexts (``images [B, 2C, H, W]``, labels
    ``[B, H, W]`` of both) resized by a stage's ``input_scale``, then :func:`augment_with_context`."""
    _, context_masks = scale_batch(images[:, :1], context_masks, input_scale)
    images, masks = scale_batch(images, masks, input_scale)
    return augment_with_context(augment, images, masks, context_masks, context_scale, generator)
