"""The perturbations of consistency training (FixMatch / UniMatch), vectorised over the batch.

- :func:`confident_pseudo_labels`: argmax of the weak view's probabilities, ``ignore_index``
  wherever the top probability is below the threshold (UniMatch: 0.95) or the pixel is not valid
  (padding, outside the image).
- :func:`cutmix_boxes` + :func:`cutmix`: one random box per image (UniMatch's rule: with
  probability 0.5, area 2-40% of the image, aspect ratio in [0.3, 1 / 0.3]); inside the box the
  image *and* its pseudo-labels come from a partner image, so they stay consistent.
- :func:`strong_photometric`: color jitter (p 0.8: brightness, contrast, saturation 0.5, hue
  0.25), grayscale (p 0.2) and Gaussian blur (p 0.5, sigma 0.1-2.0), UniMatch's strong view; on
  images only (labels are unchanged by photometric changes).
- :func:`feature_dropout`: channel dropout of encoder feature maps (p 0.5), the feature
  perturbation stream.

Random numbers come from a ``torch.Generator`` (or torch's global CPU generator), so a trainer
that restores the RNG state resumes bit-exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from kornia.filters import gaussian_blur2d
from torch import Tensor

from labelwise.data.transforms import on_colour_bands

__all__ = ["StrongAugmentConfig", "confident_pseudo_labels", "cutmix", "cutmix_boxes", "feature_dropout",
           "strong_photometric"]


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def confident_pseudo_labels(probabilities: Tensor, threshold: float, valid: Tensor | None = None,
                            ignore_index: int = 255) -> Tensor:
    """``probabilities [B, K, H, W]`` (softmax of the weak view) -> long ``[B, H, W]``: the argmax,
    ``ignore_index`` where the top probability is ``< threshold`` or ``valid [B, H, W]`` is False."""
    confidence, labels = probabilities.max(1)
    unsure = confidence < threshold
    if valid is not None:
        unsure |= ~valid.bool()
    return labels.masked_fill(unsure, ignore_index)


def cutmix_boxes(batch: int, height: int, width: int, generator: torch.Generator | None = None,
                 probability: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                 ratio: tuple[float, float] = (0.3, 1 / 0.3)) -> Tensor:
    """bool ``[B, H, W]``: one axis-aligned box per image (all False with probability
    ``1 - probability``); box area a uniform fraction ``area`` of the image, aspect ratio
    ``w / h`` log-uniform in ``ratio``, position uniform with the box inside the image."""
    apply = torch.rand(batch, generator=generator) < probability
    fraction = _uniform((batch,), area[0], area[1], generator)
    log_ratio = _uniform((batch,), math.log(ratio[0]), math.log(ratio[1]), generator)
    box_area = fraction * height * width
    box_h = torch.sqrt(box_area / log_ratio.exp()).round().clamp(1, height)
    box_w = torch.sqrt(box_area * log_ratio.exp()).round().clamp(1, width)
    top = (torch.rand(batch, generator=generator) * (height - box_h + 1)).floor()
    left = (torch.rand(batch, generator=generator) * (width - box_w + 1)).floor()
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    return inside & apply[:, None, None]


def cutmix(images: Tensor, labels: Tensor, boxes: Tensor, partner_images: Tensor, partner_labels: Tensor
           ) -> tuple[Tensor, Tensor]:
    """Paste the partners inside ``boxes [B, H, W]``: images ``[B, C, H, W]`` and labels
    ``[B, H, W]`` (or any ``[B, ..., H, W]`` label tensor) both take the partner's values there."""
    mixed_images = torch.where(boxes[:, None], partner_images, images)
    label_boxes = boxes.reshape(boxes.shape[0], *([1] * (labels.dim() - 3)), *boxes.shape[1:])
    return mixed_images, torch.where(label_boxes, partner_labels, labels)


@dataclass
class StrongAugmentConfig:
    """UniMatch's strong photometric view (module docstring)."""

    jitter_probability: float = 0.8
    brightness: float = 0.5
    contrast: float = 0.5
    saturation: float = 0.5
    hue: float = 0.25
    grayscale_probability: float = 0.2
    blur_probability: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def strong_photometric(images: Tensor, generator: torch.Generator | None = None,
                       config: StrongAugmentConfig | None = None) -> Tensor:
    """``images [B, C, H, W]`` in [0, 1] -> the strong view, each image with its own draws (on
    the first three bands; further bands such as near infrared pass unchanged)."""
    return on_colour_bands(_strong_photometric, images, generator, config)


def _strong_photometric(images: Tensor, generator: torch.Generator | None = None,
                        config: StrongAugmentConfig | None = None) -> Tensor:
    config = config or StrongAugmentConfig()
    b = images.shape[0]
    device = images.device
    jitter = (torch.rand(b, generator=generator) < config.jitter_probability).to(device)
    brightness = _uniform((b,), -config.brightness, config.brightness, generator).to(device)
    contrast = _uniform((b,), 1 - config.contrast, 1 + config.contrast, generator).to(device)
    saturation = _uniform((b,), 1 - config.saturation, 1 + config.saturation, generator).to(device)
    hue = _uniform((b,), -config.hue, config.hue, generator).to(device) * 2 * math.pi
    gray = (torch.rand(b, generator=generator) < config.grayscale_probability).to(device)
    blur = (torch.rand(b, generator=generator) < config.blur_probability).to(device)
    sigma = _uniform((b,), *config.blur_sigma, generator).to(device)

    x = images.float()
    jittered = adjust_brightness(x, brightness, clip_output=True)
    jittered = adjust_contrast(jittered, contrast, clip_output=True)
    jittered = adjust_saturation(jittered, saturation)
    jittered = adjust_hue(jittered, hue).clamp(0, 1)
    x = torch.where(jitter[:, None, None, None], jittered, x)
    x = torch.where(gray[:, None, None, None], rgb_to_grayscale(x).expand_as(x), x)
    kernel = 2 * math.ceil(3 * config.blur_sigma[1]) + 1
    blurred = gaussian_blur2d(x, (kernel, kernel), torch.stack([sigma, sigma], 1), border_type="reflect")
    x = torch.where(blur[:, None, None, None], blurred, x)
    return x.to(images.dtype)


def feature_dropout(features: list[Tensor], probability: float = 0.5, generator: torch.Generator | None = None
                    ) -> list[Tensor]:
    """Channel dropout of every feature map ``[B, C, h, w]``: whole channels zeroed with
    ``probability`` per image, the rest scaled by ``1 / (1 - probability)`` (``F.dropout2d``
    semantics with an explicit generator)."""
    out = []
    for f in features:
        keep = (torch.rand(f.shape[0], f.shape[1], generator=generator) >= probability).to(f.device, f.dtype)
        out.append(f * keep[:, :, None, None] / (1 - probability))
    return out
