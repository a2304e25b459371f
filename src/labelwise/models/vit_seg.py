"""``vit_linear``: semantic segmentation with a ViT backbone and a light head on patch tokens.

The base class normalises and pads the image to a multiple of the patch size; the ViT runs
``forward_tokens`` on that tensor (so it does not normalise a second time) and its patch tokens
``[B, D, h, w]`` go through the head:

- ``head="linear"``: BatchNorm + 1x1 conv to ``num_classes`` (the DINO linear probe /
  Segmenter "linear" decoder);
- ``head="mlp"``: 1x1 ConvBNReLU to ``head_width`` channels, 3x3 ConvBNReLU, 1x1 conv to
  ``num_classes``.

The ``[B, num_classes, h, w]`` logits are upsampled bilinearly by ``patch_size`` to the padded
image and cropped to ``H x W`` by the base class. ``encoder`` is the ``VisionTransformer``, so
``encoder_parameters()`` are what a pretrained checkpoint (``vit_loading.load_vit``) fills:
``model.encoder.load_state_dict(load_vit(path).state_dict())``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.models.base import SegmentationModel, check_choice, check_int, check_probability, register_model
from labelwise.models.blocks import ConvBNReLU
from labelwise.models.heads import PixelClassifier
from labelwise.models.vit import VisionTransformer, ViTConfig

HEADS = ("linear", "mlp")


def make_head(kind: str, embed_dim: int, num_classes: int, width: int, dropout: float) -> nn.Module:
    """Patch tokens ``[B, embed_dim, h, w]`` -> logits ``[B, num_classes, h, w]``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if kind == "linear":
        layers["bn"] = nn.BatchNorm2d(embed_dim)
        layers["classifier"] = PixelClassifier(embed_dim, num_classes, dropout=dropout)
    else:
        layers["reduce"] = ConvBNReLU(embed_dim, width, 1)
        layers["conv"] = ConvBNReLU(width, width, 3)
        layers["classifier"] = PixelClassifier(width, num_classes, dropout=dropout)
    return nn.Sequential(layers)


@register_model("vit_linear")
class ViTSegmenter(SegmentationModel):
    """ViT + head: images ``[B, in_channels, H, W]`` in [0, 1] -> logits ``[B, num_classes, H, W]``.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        arch: ``"vit_tiny"``, ``"vit_small"``, ``"vit_base"``, ``"vit_large"`` (or ``"custom"``
            with ``embed_dim``, ``depth`` and ``num_heads``).
        embed_dim, depth, num_heads: override the ``arch`` values (``None``: from ``arch``).
        patch_size: patch side (``output_stride``); 8, 14 and 16 are the usual ones.
        num_registers: DINOv2 register tokens.
        layer_scale: LayerScale init value (``None``: no LayerScale; DINOv2 uses 1e-5).
        pos_grid: side of the stored position-embedding grid (14 for DINO /16, 37 for DINOv2).
        head: ``"linear"`` or ``"mlp"`` (see the module docstring).
        head_width: channels of the ``"mlp"`` head.
        dropout: ``Dropout2d`` before the classifier conv.
        drop_path: stochastic-depth rate of the last ViT block (linear in depth).

    ``encode`` returns ``[patch_tokens [B, D, h, w]]``.
    """

    model_name = "vit_linear"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        arch: str = "vit_small",
        patch_size: int = 16,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        num_registers: int = 0,
        layer_scale: float | None = None,
        pos_grid: int = 14,
        head: str = "linear",
        head_width: int = 256,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        vit_options = dict(arch=arch, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           num_registers=num_registers, layer_scale=layer_scale, pos_grid=pos_grid,
                           drop_path=drop_path)
        super().__init__(num_classes, in_channels, **vit_options, head=head, head_width=head_width, dropout=dropout)
        check_choice("head", head, HEADS)
        check_int("head_width", head_width, 1)
        check_probability("dropout", dropout)
        self.encoder = VisionTransformer(ViTConfig(**vit_options, in_channels=in_channels))
        self.output_stride = self.encoder.patch_size
        self.head = make_head(head, self.encoder.embed_dim, num_classes, head_width, dropout)

    def _encode(self, x: Tensor) -> list[Tensor]:
        tokens, _ = self.encoder.forward_tokens(x)
        batch = x.shape[0]
        h, w = x.shape[-2] // self.output_stride, x.shape[-1] // self.output_stride
        patches = tokens[:, self.encoder.num_prefix_tokens:]
        return [patches.transpose(1, 2).reshape(batch, self.encoder.embed_dim, h, w)]

    def _decode(self, features: list[Tensor]) -> Tensor:
        logits = self.head(features[-1])
        size = (logits.shape[-2] * self.output_stride, logits.shape[-1] * self.output_stride)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
