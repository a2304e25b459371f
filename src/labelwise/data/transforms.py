"""Paired image/mask batch augmentation on tensors, vectorised over the batch (kornia).

The geometric part builds one affine matrix per sample (flip, rotation and scale about a random
crop centre, translation of that centre to the output centre) and warps the image bilinearly
and the mask with nearest neighbour through the same matrix, so they stay aligned. Pixels that
come from outside the input are 0 in the image and ``ignore_index`` in the mask. The
photometric part (brightness, contrast, saturation, hue) touches images only.

Random numbers come from torch's CPU generator (the global one, or ``generator``), so a
trainer that saves ``torch.get_rng_state()`` resumes bit-exactly.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_contrast_with_mean_subtraction, adjust_hue, adjust_saturation_with_gray_subtraction
from kornia.geometry.transform import warp_affine

from labelwise.config import AugmentConfig
from labelwise.errors import ConfigError


def as_augment_config(config: Any = None) -> AugmentConfig:
    """An :class:`AugmentConfig` from ``None`` (defaults), an AugmentConfig, a mapping, or any
    object with the same attribute names (e.g. the YAML-loaded stage config); validated."""
    if config is None:
        return AugmentConfig()
    if isinstance(config, AugmentConfig):
        return config
    names = [f.name for f in fields(AugmentConfig)]
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise ConfigError(f"augment: unknown key(s) {unknown}; valid: {names}")
        return AugmentConfig(**config)
    values = {name: getattr(config, name) for name in names if hasattr(config, name)}
    return AugmentConfig(**values)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) < p


class PairedAugment(torch.nn.Module):
    """Random flips / rotation / scale / crop (paired) and color jitter (images only).

    Args:
        config: the settings; ``None`` for :class:`AugmentConfig` defaults.
        ignore_index: mask value written where the output looks outside the input.

    ``forward(images [B, 3, H, W] float in [0, 1], masks [B, H, W] long, generator=None)``
    returns ``(images [B, 3, h, w], masks [B, h, w])`` with ``(h, w)`` = ``crop_size`` or
    ``(H, W)``. With identity settings the output equals the input exactly.
    """

    def __init__(self, config: Any = None, ignore_index: int = 255) -> None:
        super().__init__()
        self.config = as_augment_config(config)
        self.ignore_index = int(ignore_index)

    def extra_repr(self) -> str:
        return f"{self.config}, ignore_index={self.ignore_index}"

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_batch(images, masks)
        images, masks = self.geometric(images, masks, generator)
        if self.config.jitters:
            images = self.photometric(images, generator)
        return images, masks

    # -- geometry ----------------------------------------------------------------------

    def sample_matrices(self, batch: int, height: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw per-sample affine matrices ``[B, 2, 3]`` (float64) mapping input pixel
        coordinates ``(x, y)`` (pixel centres at integers) to output pixel coordinates."""
        cfg = self.config
        out_h, out_w = cfg.crop_size or (height, width)
        flip_x = torch.where(_bernoulli(batch, cfg.hflip, generator), -1.0, 1.0).double()
        flip_y = torch.where(_bernoulli(batch, cfg.vflip, generator), -1.0, 1.0).double()
        angle = torch.deg2rad(_uniform(batch, -cfg.rotate_degrees, cfg.rotate_degrees, generator))
        lo, hi = cfg.scale
        scale = torch.exp(_uniform(batch, math.log(lo), math.log(hi), generator))
        centre_x = _centre(width, out_w, scale, generator)
        centre_y = _centre(height, out_h, scale, generator)
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        linear = torch.stack(
            [torch.stack([flip_x * cos, -flip_x * sin], -1), torch.stack([flip_y * sin, flip_y * cos], -1)], -2
        )  # [B, 2, 2]
        centre = torch.stack([centre_x, centre_y], -1)  # [B, 2]
        out_centre = torch.tensor([(out_w - 1) / 2.0, (out_h - 1) / 2.0], dtype=torch.float64)
        shift = out_centre - (linear @ centre.unsqueeze(-1)).squeeze(-1)
        return torch.cat([linear, shift.unsqueeze(-1)], -1)

    def geometric(
        self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The paired geometric part: flips only (exact, no resampling) or a full affine warp."""
        cfg = self.config
        batch, _, height, width = images.shape
        if not cfg.warps:
            flip_x = _bernoulli(batch, cfg.hflip, generator).to(images.device)
            flip_y = _bernoulli(batch, cfg.vflip, generator).to(images.device)
            images = torch.where(flip_x.view(-1, 1, 1, 1), images.flip(-1), images)
            masks = torch.where(flip_x.view(-1, 1, 1), masks.flip(-1), masks)
            images = torch.where(flip_y.view(-1, 1, 1, 1), images.flip(-2), images)
            masks = torch.where(flip_y.view(-1, 1, 1), masks.flip(-2), masks)
            return images, masks
        matrices = self.sample_matrices(batch, height, width, generator)
        return warp_pair(images, masks, matrices, cfg.crop_size or (height, width), self.ignore_index)

    # -- color ------------------------------------------------------------------------

    def photometric(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample brightness, contrast, saturation (factors in ``[1-v, 1+v]``) and hue shift,
        applied in that order; images ``[B, C, H, W]`` in [0, 1] (bands after the third, e.g.
        near infrared, are left as they are: see :func:`on_colour_bands`)."""
        return on_colour_bands(self._photometric, images, generator)

    def _photometric(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        batch = images.shape[0]

        def factors(v: float) -> torch.Tensor:
            return _uniform(batch, 1.0 - v, 1.0 + v, generator).to(images.device, images.dtype)

        if cfg.brightness > 0:
            images = (images * factors(cfg.brightness).view(-1, 1, 1, 1)).clamp(0.0, 1.0)
        if cfg.contrast > 0:
            images = adjust_contrast_with_mean_subtraction(images, factors(cfg.contrast))
        if cfg.saturation > 0:
            images = adjust_saturation_with_gray_subtraction(images, factors(cfg.saturation)).clamp(0.0, 1.0)
        if cfg.hue > 0:
            shift = _uniform(batch, -cfg.hue, cfg.hue, generator) * (2 * math.pi)
            images = adjust_hue(images, shift.to(images.device, images.dtype)).clamp(0.0, 1.0)
        return images


def on_colour_bands(transform: Callable[..., torch.Tensor], images: torch.Tensor, *args: Any) -> torch.Tensor:
    """``transform(images[:, :3], *args)`` with the bands after the third (near infrared of a
    4-band orthophoto) passed through unchanged: colour jitter, hue and greyscale have no
    meaning for them. Three-band images go to ``transform`` whole."""
    if images.shape[1] <= 3:
        return transform(images, *args)
    return torch.cat([transform(images[:, :3], *args), images[:, 3:]], dim=1)


def _centre(extent: int, out: int, scale: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Crop centre (input pixel coordinates) per sample: uniform such that the window of
    ``out / scale`` input pixels stays inside ``extent`` when it fits, else such that the input
    stays inside the window."""
    half = out / scale / 2.0
    low = half - 0.5
    high = extent - 0.5 - half
    u = torch.rand(scale.shape[0], generator=generator, dtype=torch.float64)
    return torch.minimum(low, high) + u * (high - low).abs()


def warp_pair(
    images: torch.Tensor, masks: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int], ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp images ``[B, C, H, W]`` (bilinear, zero padding) and masks ``[B, H, W]`` (nearest,
    ``ignore_index`` padding) with the input→output affine ``matrices`` ``[B, 2, 3]`` to
    ``size`` = (h, w)."""
    matrices = matrices.to(images.device, torch.float32)
    out_images = warp_affine(images, matrices, size, mode="bilinear", padding_mode="zeros", align_corners=True)
    # shift labels by one so that 0 marks "outside the input"; small ints are exact in float32
    shifted = (masks.to(torch.float32) + 1.0).unsqueeze(1)
    warped = warp_affine(shifted, matrices, size, mode="nearest", padding_mode="zeros", align_corners=True)
    labels = warped.squeeze(1).round().long()
    out_masks = torch.where(labels == 0, torch.full_like(labels, ignore_index), labels - 1)
    return out_images, out_masks


def scale_batch(images: torch.Tensor, masks: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`resize_batch` to ``round(scale * (H, W))``; the inputs themselves when ``scale`` is 1."""
    if scale == 1.0:
        return images, masks
    height, width = images.shape[-2:]
    scaled, scaled_masks = resize_batch(images, masks, (round(height * scale), round(width * scale)))
    assert scaled_masks is not None
    return scaled, scaled_masks


def resize_batch(images: torch.Tensor, masks: torch.Tensor | None, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize images ``[B, C, H, W]`` bilinearly (antialiased when shrinking) and masks
    ``[B, H, W]`` by nearest neighbour (pixel-centre sampling) to ``size`` = (h, w)."""
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) != size:
        shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    if masks is not None and tuple(masks.shape[-2:]) != size:
        masks = F.interpolate(masks[:, None].to(torch.float32), size=size, mode="nearest-exact")[:, 0].round().long()
    return images, masks


def _check_batch(images: torch.Tensor, masks: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if masks.dim() != 3:
        raise ValueError(f"masks must be [B, H, W], got shape {tuple(masks.shape)}")
    if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} differ in batch or size")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
