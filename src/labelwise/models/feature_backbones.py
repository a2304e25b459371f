"""Frozen feature backbones of unsupervised segmentation: a ViT, a pretrained CNN, or both.

Every backbone maps images ``[B, 3, H, W]`` in [0, 1] (it normalises them itself) to patch
features ``[B, D, ceil(H / s), ceil(W / s)]`` with ``s = backbone.patch_size`` (the grid covers the
image padded at the bottom/right to a multiple of ``s``, as a ViT's does), and describes itself
with ``feature_backbone_config(backbone)`` so that an exported model rebuilds it
(:func:`feature_backbone_from_config`) and a feature cache keys on it.

``features.backbone`` names one (:func:`load_feature_backbone`):

- a ViT: any name or file :func:`~labelwise.models.vit_loading.load_vit` reads
  (``labelwise_default``, ``dino_vits8``, a checkpoint path);
- a CNN: a pretrained weights name of :mod:`labelwise.models.pretrained`
  (``mobilenet_v2_imagenet``), optionally ``@stage4,stage5`` for the encoder stages to
  concatenate (default the last one, ``stage5``): :class:`CNNFeatures`, at output stride 16 by
  dilation so its grid is that of a ViT/16;
- ``color_histogram``: :class:`ColorHistogramFeatures`, a per-patch soft histogram of CIE Lab
  colour (no weights; a colour-aware part to join to a learned backbone);
- several joined by ``+`` (``labelwise_default+mobilenet_v2_imagenet``): :class:`ConcatFeatures`,
  each part's features L2-normalised per patch, resampled to the first part's grid and
  concatenated, divided by ``sqrt(parts)`` so the joined vector has unit norm (each part weighs the
  same in every cosine whatever its width).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import ConfigError
from labelwise.features.attention import patch_tokens
from labelwise.models.vit import VisionTransformer, ViTConfig

__all__ = ["CNNFeatures", "ColorHistogramFeatures", "ConcatFeatures", "backbone_preprocessing",
           "feature_backbone_config", "feature_backbone_from_config", "is_vit", "load_feature_backbone"]

#: Encoder stages a :class:`CNNFeatures` may take, by name (1-based, strides 2 ... 32).
CNN_STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5")
CNN_OUTPUT_STRIDE = 16
#: ``features.backbone`` name of :class:`ColorHistogramFeatures` (default bins).
COLOR_HISTOGRAM = "color_histogram"


def is_vit(backbone: nn.Module) -> bool:
    return isinstance(backbone, VisionTransformer)


class CNNFeatures(nn.Module):
    """A pretrained CNN encoder as a patch-feature backbone.

    ``forward(images [B, 3, H, W] in [0, 1]) -> [B, D, ceil(H / 16), ceil(W / 16)]``: the chosen
    encoder stages (each pooled or resampled to the stride-16 grid when its stride differs),
    concatenated; ``D`` is the sum of their channels (1,280 for ``stage5`` of MobileNetV2).

    Args:
        weights: a ``NAMED_WEIGHTS`` name (``mobilenet_v2_imagenet``) or None (random init).
            Inside ``skip_pretrained_weights()`` the named file is not read (an artifact rebuilds
            the architecture, then its own weights replace these).
        stages: encoder stage names (``CNN_STAGES``).
        encoder: the encoder architecture (``mobilenet_v2``).
        convention: the input convention (``auto``: that of the weights).
    """

    def __init__(self, weights: str | None, stages: Sequence[str] = ("stage5",), encoder: str = "mobilenet_v2",
                 convention: str = "auto") -> None:
        from labelwise.models.encoders import build_encoder

        super().__init__()
        unknown = [s for s in stages if s not in CNN_STAGES]
        if unknown or not stages:
            raise ConfigError(f"features.backbone: unknown CNN stage(s) {unknown or list(stages)} "
                              f"(valid: {list(CNN_STAGES)})")
        self.encoder_module, input_convention = build_encoder(encoder, weights, convention=convention,
                                                              output_stride=CNN_OUTPUT_STRIDE)
        self.encoder, self.weights_name, self.stages = encoder, weights, tuple(stages)
        self.convention = input_convention.name
        self.patch_size = CNN_OUTPUT_STRIDE
        self.register_buffer("pixel_mean", torch.tensor(input_convention.mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(input_convention.std).view(1, 3, 1, 1))
        channels = self.encoder_module.channels
        self.embed_dim = sum(channels[CNN_STAGES.index(s)] for s in self.stages)

    def config(self) -> dict[str, Any]:
        return {"type": "cnn", "encoder": self.encoder, "weights": self.weights_name, "stages": list(self.stages),
                "convention": self.convention, "output_stride": self.patch_size}

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        grid = (math.ceil(height / self.patch_size), math.ceil(width / self.patch_size))
        outputs = self.encoder_module((images - self.pixel_mean) / self.pixel_std)
        maps = [_to_grid(outputs[CNN_STAGES.index(s)], grid) for s in self.stages]
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)


def _to_grid(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """``features [B, C, h', w']`` on the ``grid`` (area-averaged when finer, bilinear otherwise)."""
    if tuple(features.shape[-2:]) == grid:
        return features
    if features.shape[-2] >= grid[0] and features.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(features, grid)
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


class ColorHistogramFeatures(nn.Module):
    """A per-patch soft colour histogram in CIE Lab, as a weight-free feature backbone.

    ``forward(images [B, 3, H, W] in [0, 1]) -> [B, L * A * A, ceil(H / s), ceil(W / s)]``: the
    image (padded at the bottom/right by replication to a multiple of ``s = patch_size``) in Lab,
    each pixel spread over the joint bins by triangular (linear) memberships per channel (bin
    centres evenly spaced over L* in [0, 100] and a*, b* in [-ab_range, ab_range], values outside
    clamped), averaged over each ``s x s`` patch; the square root of that histogram is returned, so
    every patch vector has unit L2 norm and the cosine of two patches is the Bhattacharyya
    coefficient of their colour distributions.

    Args:
        patch_size: the patch side in pixels (16: the grid of a ViT/16 or a stride-16 CNN).
        lightness_bins: bins over L* (``L``).
        ab_bins: bins over each of a* and b* (``A``).
        ab_range: a* and b* are clamped to ``[-ab_range, ab_range]`` (CIE Lab units).
    """

    def __init__(self, patch_size: int = 16, lightness_bins: int = 5, ab_bins: int = 5, ab_range: float = 60.0) -> None:
        super().__init__()
        if patch_size < 1 or lightness_bins < 2 or ab_bins < 2 or ab_range <= 0:
            raise ConfigError("features.backbone: color_histogram needs patch_size >= 1, at least 2 bins per "
                              f"channel and ab_range > 0 (got {patch_size}, {lightness_bins}, {ab_bins}, {ab_range})")
        self.patch_size, self.lightness_bins, self.ab_bins = int(patch_size), int(lightness_bins), int(ab_bins)
        self.ab_range = float(ab_range)
        self.embed_dim = self.lightness_bins * self.ab_bins ** 2

    def config(self) -> dict[str, Any]:
        return {"type": "color_histogram", "patch_size": self.patch_size, "lightness_bins": self.lightness_bins,
                "ab_bins": self.ab_bins, "ab_range": self.ab_range}

    def forward(self, images: Tensor) -> Tensor:
        from kornia.color import rgb_to_lab

        size = self.patch_size
        height, width = images.shape[-2:]
        pad = (0, -width % size, 0, -height % size)
        padded = F.pad(images.float().clamp(0, 1), pad, mode="replicate") if any(pad) else images.float().clamp(0, 1)
        lab = rgb_to_lab(padded)
        lightness = _triangular_memberships(lab[:, 0], 0.0, 100.0, self.lightness_bins)  # [B, L, H, W]
        a_star = _triangular_memberships(lab[:, 1], -self.ab_range, self.ab_range, self.ab_bins)
        b_star = _triangular_memberships(lab[:, 2], -self.ab_range, self.ab_range, self.ab_bins)
        # Pool the a*b* joint first (A * A channels), then one lightness channel at a time: the
        # full joint at image resolution would need L * A * A maps of the whole image at once.
        ab = (a_star.unsqueeze(2) * b_star.unsqueeze(1)).flatten(1, 2)  # [B, A*A, H, W]
        joint = [F.avg_pool2d(ab * lightness[:, i:i + 1], size) for i in range(self.lightness_bins)]
        return torch.cat(joint, dim=1).clamp_min(0).sqrt()


def _triangular_memberships(values: Tensor, low: float, high: float, bins: int) -> Tensor:
    """``values [B, H, W]`` -> ``[B, bins, H, W]``: linear interpolation weights to ``bins`` evenly
    spaced centres from ``low`` to ``high`` (values clamped to that range; weights sum to 1)."""
    position = (values.clamp(low, high) - low) / (high - low) * (bins - 1)
    centres = torch.arange(bins, dtype=values.dtype, device=values.device).view(1, bins, 1, 1)
    return (1 - (position.unsqueeze(1) - centres).abs()).clamp_min(0)


class ConcatFeatures(nn.Module):
    """Several backbones' features joined per patch: each L2-normalised, on the first part's grid,
    concatenated and scaled by ``1 / sqrt(len(parts))`` (unit-norm result).

    ``forward(images [B, 3, H, W] in [0, 1]) -> [B, sum(D_i), h, w]`` (float32).
    """

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(parts) < 2:
            raise ConfigError("features.backbone: a '+' backbone needs at least two parts")
        self.parts = nn.ModuleList(parts)
        self.patch_size = int(parts[0].patch_size)
        self.embed_dim = sum(int(p.embed_dim) for p in parts)

    def config(self) -> dict[str, Any]:
        return {"type": "concat", "parts": [feature_backbone_config(p) for p in self.parts]}

    def forward(self, images: Tensor) -> Tensor:
        first = F.normalize(patch_tokens(self.parts[0](images)).float(), dim=1)
        grid = tuple(first.shape[-2:])
        maps = [first] + [F.normalize(_to_grid(patch_tokens(p(images)).float(), grid), dim=1)  # type: ignore[arg-type]
                          for p in self.parts[1:]]
        return torch.cat(maps, dim=1) / math.sqrt(len(maps))


def feature_backbone_config(backbone: nn.Module) -> dict[str, Any]:
    """What rebuilds ``backbone`` without its weights (:func:`feature_backbone_from_config`)."""
    if is_vit(backbone):
        return {"type": "vit", "vit": backbone.config.to_dict()}  # type: ignore[operator]
    if isinstance(backbone, (CNNFeatures, ColorHistogramFeatures, ConcatFeatures)):
        return backbone.config()
    raise ConfigError(f"{type(backbone).__name__} is not a feature backbone "
                      "(a ViT, CNNFeatures, ColorHistogramFeatures or ConcatFeatures)")


def feature_backbone_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The architecture :func:`feature_backbone_config` describes, with random weights (an
    artifact's weights replace them), in eval mode."""
    from labelwise.models.encoders import skip_pretrained_weights

    kind = config.get("type")
    if kind == "vit":
        return VisionTransformer(ViTConfig.from_dict(config["vit"])).eval()
    if kind == "cnn":
        with skip_pretrained_weights():
            module = CNNFeatures(config.get("weights"), config.get("stages", ("stage5",)),
                                 config.get("encoder", "mobilenet_v2"), config.get("convention", "auto"))
        return module.eval()
    if kind == "color_histogram":
        return ColorHistogramFeatures(int(config.get("patch_size", 16)), int(config.get("lightness_bins", 5)),
                                      int(config.get("ab_bins", 5)), float(config.get("ab_range", 60.0))).eval()
    if kind == "concat":
        return ConcatFeatures([feature_backbone_from_config(part) for part in config["parts"]]).eval()
    raise ConfigError(f"backbone config: unknown type {kind!r} (valid: vit, cnn, color_histogram, concat)")


def _load_part(spec: str) -> nn.Module:
    from labelwise.models.pretrained import is_weights_name
    from labelwise.models.vit_loading import load_vit

    name, _, stages = spec.partition("@")
    if name == COLOR_HISTOGRAM and not stages:
        return ColorHistogramFeatures()
    if is_weights_name(name):
        return CNNFeatures(name, tuple(s.strip() for s in stages.split(",")) if stages else ("stage5",))
    if stages:
        raise ConfigError(f"features.backbone: {spec!r}: '@stages' applies to CNN weights names only")
    return load_vit(name)


def load_feature_backbone(spec: str) -> nn.Module:
    """The frozen backbone ``spec`` names (module docstring), in eval mode without gradients."""
    parts = [part.strip() for part in spec.split("+")]
    if any(not part for part in parts):
        raise ConfigError(f"features.backbone: empty part in {spec!r}")
    backbone = _load_part(parts[0]) if len(parts) == 1 else ConcatFeatures([_load_part(p) for p in parts])
    backbone.eval()
    for param in backbone.parameters():
        param.requires_grad_(False)
    return backbone


def backbone_preprocessing(backbone: nn.Module) -> dict[str, Any]:
    """The ``preprocessing`` record of an exported model built on ``backbone``."""
    record: dict[str, Any] = {"input": "RGB float [B, 3, H, W] in [0, 1]; the backbone normalises and pads itself",
                              "pad_to_multiple_of": int(backbone.patch_size)}
    if isinstance(backbone, ConcatFeatures):
        record["parts"] = [backbone_preprocessing(part) for part in backbone.parts]
        return record
    if isinstance(backbone, ColorHistogramFeatures):
        record["color_space"] = "CIE Lab (D65) of the [0, 1] RGB input; no mean/std normalisation"
        return record
    record["mean"] = [round(float(v), 6) for v in backbone.pixel_mean.flatten()]
    record["std"] = [round(float(v), 6) for v in backbone.pixel_std.flatten()]
    return record
