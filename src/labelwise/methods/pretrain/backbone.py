"""The networks pretraining trains, behind one interface, and their export.

A backbone maps images ``[B, 3, H, W]`` in [0, 1] to :class:`Features`: a pooled vector per
image and a dense feature map. ViT: the [CLS] token and the patch tokens. U-Net: the mean and
the map itself of the deepest encoder stage (only the encoder is built into the training
module, so no decoder parameter sits unused in the optimiser or under DDP).

The exported backbone (a run's ``weights.safetensors``) is, for a ViT, a ``save_vit`` file (``load_vit`` reads
it); for a U-Net, the encoder tensors under their names in the full model (``encoder.*``) with
the model options as JSON in the metadata; ``labelwise.models.init.initialise_from``
reads both.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from labelwise.errors import ConfigError
from labelwise.io.atomic import atomic_path
from labelwise.methods.pretrain.config import BackboneConfig
from labelwise.models import create, create_vit
from labelwise.models.base import pad_to_multiple
from labelwise.models.vit import VisionTransformer
from labelwise.models.vit_loading import save_vit

UNET_BACKBONE_FORMAT = "labelwise_unet_encoder"


class Features(NamedTuple):
    """``pooled [B, D]`` (one vector per image) and ``dense [B, D, h, w]`` (per location)."""

    pooled: Tensor
    dense: Tensor


class ViTBackbone(nn.Module):
    """A :class:`VisionTransformer` as a backbone: [CLS] token + patch tokens.

    ``forward(images, masks=None)``: ``masks`` bool ``[B, h * w]`` replaces those patch tokens by
    the mask token (iBOT)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit
        self.dim = vit.embed_dim
        self.stride = vit.patch_size

    def forward(self, images: Tensor, masks: Tensor | None = None) -> Features:
        out = self.vit(images, masks=masks)
        return Features(out.cls_token, out.patch_tokens)


class UNetBackbone(nn.Module):
    """The encoder of a labelwise U-Net (plain, or on a pretrained encoder such as ImageNet
    MobileNetV2 with ``encoder: mobilenet_v2``) as a backbone: the deepest map ``[B, C, H / s,
    W / s]`` (``s`` the output stride) and its spatial mean. Normalises and pads like the full
    model."""

    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__()
        model = create("unet", num_classes=1, **options)
        self.model_config = model.config()
        self.encoder = model.encoder
        self.stride = model.output_stride
        # the plain U-Net lists its stage channels; a pretrained encoder (encoder: mobilenet_v2) its own
        self.dim = model.encoder_channels[-1] if hasattr(model, "encoder_channels") else model.encoder.channels[-1]
        # the model's normalisation: ImageNet mean/std, or the input convention of the encoder's weights
        self.register_buffer("pixel_mean", model.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.clone(), persistent=False)

    def forward(self, images: Tensor, masks: Tensor | None = None) -> Features:
        if masks is not None:
            raise ValueError("UNetBackbone cannot mask patches (masked-patch objectives need a ViT)")
        x = pad_to_multiple((images - self.pixel_mean) / self.pixel_std, self.stride)
        if images.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        deepest = self.encoder(x)[-1]
        return Features(deepest.mean((2, 3)), deepest)


Backbone = ViTBackbone | UNetBackbone


def build_backbone(config: BackboneConfig, mask_token: bool = False, teacher: bool = False) -> Backbone:
    """The student (or, ``teacher=True``, the teacher: no drop path) backbone of ``config``.

    Raises:
        ConfigError: an invalid architecture or option, prefixed with ``backbone``.
    """
    try:
        if config.kind == "vit":
            vit = create_vit(config.arch, config.patch_size, num_registers=config.num_registers,
                             drop_path=0.0 if teacher else config.drop_path, mask_token=mask_token, **config.options)
            return ViTBackbone(vit)
        return UNetBackbone(dict(config.options))
    except ConfigError as exc:
        raise ConfigError(f"backbone: {exc}") from exc


def make_teacher(student: Backbone, config: BackboneConfig, mask_token: bool = False) -> Backbone:
    """A copy of ``student`` (same weights) without drop path and without gradients."""
    if isinstance(student, ViTBackbone):
        teacher = build_backbone(config, mask_token=mask_token, teacher=True)
        teacher.load_state_dict(student.state_dict())
    else:
        teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def export_backbone(backbone: Backbone, path: Path) -> Path:
    """Write ``backbone`` alone to ``path`` (``.safetensors``, atomically); see the module docstring."""
    path = Path(path)
    if isinstance(backbone, ViTBackbone):
        return save_vit(backbone.vit, path)
    tensors = {f"encoder.{k}": v.detach().contiguous().cpu() for k, v in backbone.encoder.state_dict().items()}
    metadata = {"format": UNET_BACKBONE_FORMAT, "model_config": json.dumps(backbone.model_config)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
