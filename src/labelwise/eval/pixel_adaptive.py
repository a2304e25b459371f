"""Pixel-adaptive refinement of score maps by colour, position and (optionally) feature affinity
(PAR; the refinement of AFA, CVPR 2022, and ToCo, CVPR 2023), at image resolution.

Each pixel ``i`` looks at its neighbours ``j`` in the 8 directions at every dilation ``d`` of
``dilations`` (offsets ``(dy, dx)`` in ``{-d, 0, d}^2 \\ {(0, 0)}``; beyond the image border a
neighbour is the nearest border pixel, i.e. replicate padding). The affinity of ``i`` to its
``N = 8 * len(dilations)`` neighbours is

    colour(i, j)   = -mean_c (|I_c(i) - I_c(j)| / (color_scale * s_c(i)))^2
    position(j)    = -(|o_j| / (color_scale * s_o))^2
    feature(i, j)  = cos(f(i), f(j)) / feature_temperature
    a(i, j)        = (softmax_j colour(i, j) + position_weight * softmax_j position(j)
                      + feature_weight * softmax_j feature(i, j))
                     / (1 + position_weight + feature_weight)

where ``I`` is the image in [0, 1], ``s_c(i)`` the standard deviation (``correction=1``) of channel
``c`` over ``i``'s neighbours (plus 1e-8), ``|o_j|`` the Euclidean length of the offset and ``s_o``
the standard deviation of those lengths, and ``f`` a feature map (e.g. the classifier's last stage,
``[B, D, h, w]``) upsampled bilinearly to the image size; the feature term is used only when
``feature_weight > 0`` (then a feature map is required). The references use colour and position
only; the feature term is this project's, for images whose objects share colours with their
surroundings (aerial tiles, street scenes), where the classifier's own features tell them apart; it
is off by default (on the synthetic shapes, whose edges are exact colour edges, weight 1 cost 4-6
mIoU points at every stage: BENCHMARKS.md, weak_synthetic). Then, ``iterations`` times, every map
is replaced by its affinity-weighted neighbour average: ``m(i) <- sum_j a(i, j) m(j)``. The
references add the two softmaxes without the final division, so their maps grow by
``(1 + position_weight)`` per iteration; here the weights sum to 1, so maps in [0, 1] stay in [0, 1] and a
fixed background threshold keeps its meaning. Defaults are ToCo's (dilations 1, 2, 4, 8, 12, 24; 10
iterations; 0.3; 0.01).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from labelwise.errors import ConfigError

__all__ = ["PixelAdaptiveConfig", "neighbour_offsets", "pixel_adaptive_affinity", "pixel_adaptive_refine"]


@dataclass
class PixelAdaptiveConfig:
    """Parameters of the refinement (module docstring)."""

    dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    iterations: int = 10
    color_scale: float = 0.3
    position_weight: float = 0.01
    feature_weight: float = 0.0
    feature_temperature: float = 0.1

    def validate(self, prefix: str = "par") -> None:
        if not self.dilations or any(int(d) != d or d < 1 for d in self.dilations):
            raise ConfigError(f"{prefix}.dilations: must be positive integers, got {self.dilations}")
        if self.iterations < 0:
            raise ConfigError(f"{prefix}.iterations: must be >= 0, got {self.iterations}")
        if self.color_scale <= 0:
            raise ConfigError(f"{prefix}.color_scale: must be > 0, got {self.color_scale}")
        if self.position_weight < 0:
            raise ConfigError(f"{prefix}.position_weight: must be >= 0, got {self.position_weight}")
        if self.feature_weight < 0:
            raise ConfigError(f"{prefix}.feature_weight: must be >= 0, got {self.feature_weight}")
        if self.feature_temperature <= 0:
            raise ConfigError(f"{prefix}.feature_temperature: must be > 0, got {self.feature_temperature}")


def neighbour_offsets(dilations: list[int]) -> list[tuple[int, int]]:
    """The ``(dy, dx)`` offsets: for each dilation, the 8 directions in row-major order."""
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(padded: Tensor, pad: int, offset: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """``x[..., y + dy, x + dx]`` for every pixel, from ``x`` replicate-padded by ``pad``."""
    top, left = pad + offset[0], pad + offset[1]
    return padded[..., top:top + size[0], left:left + size[1]]


def _feature_logits(features: Tensor, offsets: list[tuple[int, int]], size: tuple[int, int], pad: int,
                    temperature: float) -> Tensor:
    """``cos(f(i), f(j)) / temperature`` ``[B, N, H, W]`` of ``features [B, D, h, w]`` upsampled to ``size``."""
    unit = F.normalize(F.interpolate(features.float(), size=size, mode="bilinear", align_corners=False), dim=1)
    padded = F.pad(unit, (pad, pad, pad, pad), mode="replicate")
    # one neighbour at a time: [B, D, N, H, W] at once would not fit for large images
    return torch.stack([(unit * _shifted(padded, pad, o, size)).sum(1) for o in offsets], dim=1) / temperature


def pixel_adaptive_affinity(images: Tensor, config: PixelAdaptiveConfig | None = None,
                            features: Tensor | None = None) -> Tensor:
    """``a(i, j)`` of the module docstring: ``[B, N, H, W]`` for ``images [B, C, H, W]`` (weights
    over the ``N`` neighbours in :func:`neighbour_offsets` order; they sum to 1 per pixel);
    ``features [B, D, h, w]`` (any ``h, w``) are needed when ``config.feature_weight > 0``."""
    config = config or PixelAdaptiveConfig()
    config.validate()
    if config.feature_weight > 0 and features is None:
        raise ValueError("pixel_adaptive_affinity: par.feature_weight > 0 needs a feature map")
    if features is not None and (features.dim() != 4 or features.shape[0] != images.shape[0]):
        raise ValueError(f"pixel_adaptive_affinity: features must be [B, D, h, w] with B = {images.shape[0]}, "
                         f"got {list(features.shape)}")
    offsets = neighbour_offsets(list(config.dilations))
    images = images.float()
    size = (images.shape[-2], images.shape[-1])
    pad = max(config.dilations)
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    neighbours = torch.stack([_shifted(padded, pad, o, size) for o in offsets], dim=2)  # [B, C, N, H, W]
    spread = neighbours.std(dim=2, keepdim=True) + 1e-8
    colour = -(((neighbours - images.unsqueeze(2)).abs() / (spread * config.color_scale)) ** 2).mean(1)
    lengths = torch.tensor([math.hypot(*o) for o in offsets], dtype=images.dtype, device=images.device)
    position = -((lengths / ((lengths.std() + 1e-8) * config.color_scale)) ** 2)
    affinity = torch.softmax(colour, dim=1) + config.position_weight * torch.softmax(position, dim=0).view(1, -1, 1, 1)
    if config.feature_weight > 0:
        logits = _feature_logits(features, offsets, size, pad, config.feature_temperature)  # type: ignore[arg-type]
        affinity = affinity + config.feature_weight * torch.softmax(logits, dim=1)
    return affinity / (1 + config.position_weight + config.feature_weight)


@torch.no_grad()
def pixel_adaptive_refine(images: Tensor, maps: Tensor, config: PixelAdaptiveConfig | None = None,
                          features: Tensor | None = None) -> Tensor:
    """``maps [B, K, H, W]`` refined along ``images [B, C, H, W]`` (same ``H, W``) and, when
    ``config.feature_weight > 0``, ``features [B, D, h, w]`` (module docstring)."""
    config = config or PixelAdaptiveConfig()
    if images.shape[0] != maps.shape[0] or images.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"pixel_adaptive_refine: images {list(images.shape)} and maps {list(maps.shape)} "
                         "must share batch and size")
    affinity = pixel_adaptive_affinity(images, config, features)
    offsets = neighbour_offsets(list(config.dilations))
    size = (maps.shape[-2], maps.shape[-1])
    pad = max(config.dilations)
    out = maps.float()
    for _ in range(config.iterations):
        padded = F.pad(out, (pad, pad, pad, pad), mode="replicate")
        # one neighbour at a time: [B, K, N, H, W] at once would not fit for large images
        total = torch.zeros_like(out)
        for n, offset in enumerate(offsets):
            total += affinity[:, n:n + 1] * _shifted(padded, pad, offset, size)
        out = total
    return out
