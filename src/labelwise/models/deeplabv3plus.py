"""DeepLabV3+ (Chen et al., 2018) on a pretrained encoder, the usual mobile segmentation model.

- ASPP on the deepest encoder map (stride ``encoder_output_stride``, 16 by default): a 1x1 branch,
  three 3x3 atrous depthwise-separable branches (rates ``atrous_rates``; default 6, 12, 18 at
  output stride 16, doubled at 8), and image pooling; concatenated, projected by a 1x1
  ConvBNReLU to ``decoder_channels``, ``Dropout(0.1)`` in training, then a separable 3x3.
- Decoder: the ASPP output upsampled bilinearly to the stride-4 encoder map, concatenated with
  that map reduced to 48 channels by a 1x1 ConvBNReLU, a separable 3x3 ConvBNReLU, a 1x1
  classifier, and bilinear upsampling x4 to the input size.

The image-pooling branch has a conv with bias and no BatchNorm: its map is ``[B, C, 1, 1]``,
where BatchNorm in training would need more than one image per batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import ConfigError
from labelwise.models.base import check_int, register_model
from labelwise.models.blocks import ConvBNReLU, init_weights
from labelwise.models.encoder_base import EncoderSegmentationModel
from labelwise.models.heads import PixelClassifier
from labelwise.models.mobilenet_v2 import PaddedConv

LOW_LEVEL_CHANNELS = 48


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise 3x3 (``dilation``) + pointwise 1x1 ConvBNReLU: ``[B, in, H, W] -> [B, out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__(
            # PaddedConv: a dilated depthwise conv needs its NCHW workaround (see its docstring)
            PaddedConv(in_channels, in_channels, 3, dilation=dilation, groups=in_channels),
            ConvBNReLU(in_channels, out_channels, 1),
        )


class ImagePooling(nn.Module):
    """Global average -> 1x1 conv (bias) -> ReLU -> broadcast back: ``[B, in, H, W] -> [B, out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return pooled.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``[B, in, h, w] -> [B, out, h, w]`` (module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int], dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList([ConvBNReLU(in_channels, out_channels, 1)])
        self.branches.extend(SeparableConvBNReLU(in_channels, out_channels, rate) for rate in rates)
        self.branches.append(ImagePooling(in_channels, out_channels))
        self.project = ConvBNReLU(out_channels * len(self.branches), out_channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.project(torch.cat([branch(x) for branch in self.branches], dim=1)))


@register_model("deeplabv3plus")
class DeepLabV3Plus(EncoderSegmentationModel):
    """DeepLabV3+: ``[B, in_channels, H, W]`` in [0, 1] -> logits ``[B, num_classes, H, W]``.

    Args:
        num_classes: output classes.
        in_channels: image channels.
        encoder: encoder name (``mobilenet_v2``).
        encoder_weights: ``None`` (random init), ``imagenet``, ``imagenet_torchvision`` or a file.
        encoder_convention: ``auto`` (from the weights), ``tf`` or ``torchvision``.
        encoder_output_stride: 16 or 8 (dilated encoder; 8 is ~4x the ASPP cost).
        decoder_channels: channels of ASPP and decoder.
        atrous_rates: the three ASPP rates (None: 6, 12, 18 scaled by 16 / output stride).
        dropout: ``Dropout2d`` before the classifier.
    """

    model_name = "deeplabv3plus"

    def __init__(self, num_classes: int, in_channels: int = 3, encoder: str = "mobilenet_v2",
                 encoder_weights: str | None = "imagenet", encoder_convention: str = "auto",
                 encoder_output_stride: int = 16, decoder_channels: int = 256,
                 atrous_rates: Sequence[int] | None = None, dropout: float = 0.0) -> None:
        if encoder_output_stride not in (8, 16):
            raise ConfigError(f"option 'encoder_output_stride' must be 16 or 8 for deeplabv3plus, "
                              f"got {encoder_output_stride!r}")
        check_int("decoder_channels", decoder_channels, 1)
        if atrous_rates is not None:
            atrous_rates = [int(r) for r in atrous_rates]
            if len(atrous_rates) != 3 or min(atrous_rates) < 1:
                raise ConfigError(f"option 'atrous_rates' must be three positive integers, got {atrous_rates}")
        super().__init__(num_classes, in_channels, encoder, encoder_weights, encoder_convention,
                         encoder_output_stride, decoder_channels=decoder_channels, atrous_rates=atrous_rates,
                         dropout=dropout)
        rates = atrous_rates or [r * 16 // encoder_output_stride for r in (6, 12, 18)]
        channels = self.encoder.channels
        self.aspp = nn.Sequential(ASPP(channels[-1], decoder_channels, rates),
                                  SeparableConvBNReLU(decoder_channels, decoder_channels))
        self.low_level = ConvBNReLU(channels[1], LOW_LEVEL_CHANNELS, 1)
        self.fuse = SeparableConvBNReLU(decoder_channels + LOW_LEVEL_CHANNELS, decoder_channels)
        self.classifier = PixelClassifier(decoder_channels, num_classes, dropout=dropout)
        for module in (self.aspp, self.low_level, self.fuse, self.classifier):
            init_weights(module)

    def _decode(self, features: list[Tensor]) -> Tensor:
        low = self.low_level(features[1])
        x = F.interpolate(self.aspp(features[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.fuse(torch.cat([x, low], dim=1)))
        return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)


__all__ = ["ASPP", "DeepLabV3Plus", "ImagePooling", "SeparableConvBNReLU"]
