"""Class activation maps of the weak classifiers: a multi-class-token ViT (MCTformer, also on
a pretrained CNN's tokens, the hybrid) or a CNN with a pooled linear classifier (CAM).

For one view of a batch, a CNN classifier's maps are ``relu(W . f)``, its classifier weights applied
at every position of the encoder's last stage (:mod:`labelwise.models.cnn_cam`); a
multi-class-token model's come from the class-to-patch attention of the last ``blocks`` blocks (averaged
over heads, summed over blocks) gives ``[B, K, h, w]`` maps; with a v2 model they are fused with
the patch-token CAMs (``relu`` of the convolutional classifier's maps) by ``product`` or
``geometric_mean`` (``fusion: attention`` keeps the attention maps alone); ``refine`` then
propagates them along the patch-to-patch attention of the same blocks
(``cam_k(i) <- sum_j A(i, j) cam_k(j)``). Views are every ``scale`` of ``scales`` (images resized
by that factor) and, with ``flip``, their horizontal mirrors (maps mirrored back); the maps of
all views are upsampled (bilinear) to the image size and averaged. Finally each map is kept only
for the classes tagged in the image (the others are 0) and normalised per image and class to
``[0, 1]`` (divided by its maximum after ``relu``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from labelwise.errors import ConfigError
from labelwise.models.cnn_cam import CNNCAMClassifier
from labelwise.models.mctformer import MultiClassTokenViT, class_to_patch_attention, patch_to_patch_attention

__all__ = ["CAMConfig", "WeakClassifier", "class_activation_maps", "classifier_features", "refine_with_affinity"]

#: the classifiers CAMs are computed from
WeakClassifier = MultiClassTokenViT | CNNCAMClassifier


@dataclass
class CAMConfig:
    """How CAMs are computed (module docstring): ``blocks`` last blocks whose attention is used,
    ``fusion`` of attention and patch CAMs, ``refine`` with patch-to-patch attention, test-time
    ``scales`` and ``flip``.

    ``refine`` is off by default: it helps only when the patch-to-patch attention is local. On
    the labelwise default ViT-T (after MCT training on the synthetic set) each patch spreads its
    attention over ~165-177 of 192 patches ("effective neighbours" ``1 / sum_j A(i, j)^2``), so
    refinement nearly averages each map over the image (CAM mIoU 0.32 -> 0.14 there; see
    ``benchmarks/diagnostics/weak_cam_sources.py``). Turn it on for backbones with local
    attention (DINO / DeiT ViT-S/B), as the paper does."""

    blocks: int = 3
    fusion: Literal["product", "geometric_mean", "attention"] = "product"
    refine: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False

    def validate(self, depth: int | None = None) -> None:
        if self.blocks < 1 or (depth is not None and self.blocks > depth):
            raise ConfigError(f"cams.blocks: must be in [1, {depth or 'depth'}], got {self.blocks}")
        if self.fusion not in ("product", "geometric_mean", "attention"):
            raise ConfigError(f"cams.fusion: must be product, geometric_mean or attention, got {self.fusion!r}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"cams.scales: must be positive numbers, got {self.scales}")


def refine_with_affinity(cams: Tensor, affinity: Tensor) -> Tensor:
    """``out[b, k, i] = sum_j affinity[b, i, j] * cams[b, k, j]``.

    Args:
        cams: ``[B, K, P]`` maps over ``P`` patches; affinity: ``[B, P, P]``.
    """
    return torch.bmm(cams, affinity.transpose(1, 2))


def _view_maps(model: WeakClassifier, images: Tensor, config: CAMConfig) -> Tensor:
    """Raw maps ``[B, K, h, w]`` of one view."""
    if isinstance(model, CNNCAMClassifier):
        return F.relu(model(images).patch_cams.float())
    depth = model.backbone.depth
    blocks = list(range(depth - config.blocks, depth))
    output = model(images, return_attention=blocks)
    h, w = output.patch_tokens.shape[-2:]
    prefix = model.num_prefix_tokens
    cams = class_to_patch_attention(output.attentions, blocks, model.num_classes, prefix)  # [B, K, h*w]
    if config.fusion != "attention" and output.patch_cams is not None:
        patch = F.relu(output.patch_cams.float()).flatten(2)
        cams = cams * patch if config.fusion == "product" else torch.sqrt(cams * patch)
    if config.refine:
        cams = refine_with_affinity(cams, patch_to_patch_attention(output.attentions, blocks, prefix))
    return cams.reshape(cams.shape[0], cams.shape[1], h, w)


@torch.no_grad()
def classifier_features(model: WeakClassifier, images: Tensor) -> Tensor:
    """The classifier's own feature map ``[B, D, h, w]`` of ``images [B, 3, H, W]`` (in [0, 1]) at
    scale 1: a CNN's last stage, a class-token ViT's patch tokens (for feature affinity)."""
    output = model(images)
    return (output.features if isinstance(model, CNNCAMClassifier) else output.patch_tokens).float()


@torch.no_grad()
def class_activation_maps(model: WeakClassifier, images: Tensor, tags: Tensor,
                          config: CAMConfig | None = None) -> Tensor:
    """CAMs ``[B, K, H, W]`` in ``[0, 1]`` of ``images [B, 3, H, W]`` (in [0, 1]) for the classes
    tagged in ``tags [B, K]`` (bool or 0/1); untagged classes are 0 (module docstring). For a CNN
    classifier ``blocks``, ``fusion`` and ``refine`` (attention notions) do not apply."""
    config = config or CAMConfig()
    config.validate(model.backbone.depth if isinstance(model, MultiClassTokenViT) else None)
    if tags.shape != (images.shape[0], model.num_classes):
        raise ValueError(f"tags must be [B, K] = [{images.shape[0]}, {model.num_classes}], got {list(tags.shape)}")
    height, width = images.shape[-2:]
    total = images.new_zeros(images.shape[0], model.num_classes, height, width, dtype=torch.float32)
    views = 0
    for scale in config.scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if size == (height, width) else F.interpolate(images, size=size, mode="bilinear",
                                                                      align_corners=False, antialias=scale < 1)
        for flip in ([False, True] if config.flip else [False]):
            view = scaled.flip(-1) if flip else scaled
            maps = _view_maps(model, view, config).float()
            # the backbone pads bottom/right to whole patches: crop the maps to the view first
            patch = model.cam_stride
            maps = F.interpolate(maps, size=(maps.shape[-2] * patch, maps.shape[-1] * patch), mode="bilinear",
                                 align_corners=False)[..., :size[0], :size[1]]
            if flip:
                maps = maps.flip(-1)
            total += F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
            views += 1
    cams = F.relu(total / views) * tags.to(total.dtype)[:, :, None, None]
    peak = cams.flatten(2).amax(2)[:, :, None, None]
    return torch.where(peak > 0, cams / peak.clamp_min(torch.finfo(cams.dtype).tiny), torch.zeros_like(cams))
