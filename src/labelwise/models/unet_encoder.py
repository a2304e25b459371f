"""U-Net on a pretrained encoder (smp's ``Unet(encoder_name=...)``).

Decoder: five blocks from the stride-32 map up to full resolution; block ``i`` upsamples x2
(nearest, as smp), concatenates the encoder map of the same stride when there is one (strides 16,
8, 4, 2; none at stride 1) and applies two 3x3 ``ConvBNReLU`` to ``decoder_channels[i]``.
Classifier: 1x1 conv to ``num_classes`` logits at full resolution.

Built through ``create("unet", encoder="mobilenet_v2", ...)``; the encoder-less U-Net of
``models/unet.py`` is ``create("unet")`` without ``encoder``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import ConfigError
from labelwise.models.blocks import ConvBNReLU, init_weights
from labelwise.models.encoder_base import EncoderSegmentationModel
from labelwise.models.heads import PixelClassifier

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


class DecoderBlock(nn.Module):
    """``x [B, in, h, w]`` (+ ``skip [B, skip, 2h, 2w]``) -> ``[B, out, 2h, 2w]``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        size = skip.shape[-2:] if skip is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class EncoderUNet(EncoderSegmentationModel):
    """U-Net decoder on a pretrained encoder: ``[B, in_channels, H, W]`` in [0, 1] -> logits
    ``[B, num_classes, H, W]``.

    Args:
        num_classes: output classes.
        in_channels: image channels.
        encoder: encoder name (``mobilenet_v2``).
        encoder_weights: ``None`` (random init), ``imagenet``, ``imagenet_torchvision`` or a file.
        encoder_convention: ``auto`` (from the weights), ``tf`` or ``torchvision``.
        encoder_output_stride: 32 (the only value a U-Net can decode).
        decoder_channels: five channel counts, deepest block first.
        dropout: ``Dropout2d`` before the classifier.
    """

    model_name = "unet"

    def __init__(self, num_classes: int, in_channels: int = 3, encoder: str = "mobilenet_v2",
                 encoder_weights: str | None = "imagenet", encoder_convention: str = "auto",
                 encoder_output_stride: int = 32, decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS, dropout: float = 0.0) -> None:
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != 5 or min(decoder_channels) < 1:
            raise ConfigError(f"option 'decoder_channels' must be 5 positive channel counts, got {decoder_channels}")
        if encoder_output_stride != 32:
            raise ConfigError(f"option 'encoder_output_stride': the U-Net decodes every stride of the encoder, so it "
                              f"must be 32, got {encoder_output_stride!r} (deeplabv3plus takes 16 or 8)")
        super().__init__(num_classes, in_channels, encoder, encoder_weights, encoder_convention, 32,
                         decoder_channels=decoder_channels, dropout=dropout)
        skips = list(reversed(self.encoder.channels[:-1])) + [0]  # strides 16, 8, 4, 2, then none
        inputs = [self.encoder.channels[-1], *decoder_channels[:-1]]
        self.decoder = nn.ModuleList(
            DecoderBlock(c_in, c_skip, c_out) for c_in, c_skip, c_out in zip(inputs, skips, decoder_channels)
        )
        self.classifier = PixelClassifier(decoder_channels[-1], num_classes, dropout=dropout)
        init_weights(self.decoder)
        init_weights(self.classifier)

    def _decode(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        skips: list[Tensor | None] = [*reversed(features[:-1]), None]
        for block, skip in zip(self.decoder, skips):
            x = block(x, skip)
        return self.classifier(x)


__all__ = ["DecoderBlock", "EncoderUNet"]
