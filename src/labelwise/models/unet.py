"""U-Net (Ronneberger et al., 2015) with BatchNorm, optional ShuffleNet-style blocks.

Encoder: ``depth + 1`` ``DoubleConv`` stages, 2x2 max-pool between them; stage ``i`` has
``min(width * 2**i, max_width)`` channels (the last stage is the bottleneck). Decoder: for each
skip from deep to shallow, bring the deeper map to the skip's channel count and size (a 1x1
ConvBNReLU then bilinear x2, or a 2x2 stride-2 transposed conv), concatenate
``[skip, upsampled]`` and apply a ``DoubleConv`` (2 * skip -> skip channels). Reducing channels
before concatenating keeps the decoder ~25% cheaper than concatenating the deep map whole.
Classifier: 1x1 conv to ``num_classes`` logits. ``output_stride = 2**depth``.

``create("unet")`` builds this model; ``create("unet", encoder="mobilenet_v2")`` builds the
U-Net on a pretrained encoder of ``models/unet_encoder.py`` (see ``models/unet_select.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.models.base import SegmentationModel, check_choice, check_int, check_probability
from labelwise.models.blocks import (
    BLOCK_TYPES,
    PADDING_MODES,
    BlockType,
    ConvBNReLU,
    DoubleConv,
    PaddingMode,
    init_weights,
)
from labelwise.models.heads import PixelClassifier

UPSAMPLE_MODES = ("bilinear", "transpose")


class UNetEncoder(nn.Module):
    """``[B, in, H, W]`` -> list of ``len(channels)`` maps, map ``i`` is
    ``[B, channels[i], H / 2**i, W / 2**i]`` (H, W multiples of ``2**(len(channels) - 1)``)."""

    def __init__(
        self,
        in_channels: int,
        channels: list[int],
        dropout: float = 0.0,
        padding_mode: PaddingMode = "zeros",
        block: BlockType = "conv",
        groups: int = 4,
    ) -> None:
        super().__init__()
        inputs = [in_channels, *channels[:-1]]
        last = len(channels) - 1
        self.stages = nn.ModuleList(
            DoubleConv(
                c_in,
                c_out,
                dropout=dropout if i == last else 0.0,  # dropout in the bottleneck only
                padding_mode=padding_mode,
                block=block,
                groups=groups,
            )
            for i, (c_in, c_out) in enumerate(zip(inputs, channels))
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.pool(x))
            features.append(x)
        return features


class UpBlock(nn.Module):
    """Decoder stage: ``x [B, in, h, w]``, ``skip [B, skip, 2h, 2w]`` -> ``[B, skip, 2h, 2w]``.

    Maps ``x`` to ``skip`` channels at the skip's size (``"bilinear"``: 1x1 ConvBNReLU at low
    resolution, then bilinear upsampling; ``"transpose"``: 2x2 stride-2 transposed conv),
    concatenates ``[skip, x]`` and applies a ``DoubleConv`` (2 * skip -> skip channels).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        upsample: Literal["bilinear", "transpose"] = "bilinear",
        dropout: float = 0.0,
        padding_mode: PaddingMode = "zeros",
        block: BlockType = "conv",
        groups: int = 4,
    ) -> None:
        super().__init__()
        self.project: nn.Module
        if upsample == "transpose":
            self.project = nn.ConvTranspose2d(in_channels, skip_channels, 2, stride=2)
        else:
            self.project = ConvBNReLU(in_channels, skip_channels, 1)
        self.conv = DoubleConv(
            2 * skip_channels,
            skip_channels,
            dropout=dropout,
            padding_mode=padding_mode,
            block=block,
            groups=groups,
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.project(x)
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(SegmentationModel):
    """U-Net: images ``[B, in_channels, H, W]`` in [0, 1] -> logits ``[B, num_classes, H, W]``.

    Args:
        num_classes: number of output classes.
        in_channels: image channels (3 for RGB).
        depth: number of 2x downsamplings (``output_stride = 2**depth``).
        width: channels of the first stage, doubled at each downsampling ...
        max_width: ... up to this cap (``None``: no cap).
        dropout: ``Dropout2d`` probability after the bottleneck and every decoder stage.
        padding_mode: ``"zeros"`` or ``"reflect"`` padding of the 3x3 convs.
        block: ``"conv"`` (two 3x3 ConvBNReLU per stage) or ``"shuffle"``
            (``GroupedShuffleBlock``).
        groups: groups of the shuffle block's grouped convs.
        upsample: ``"bilinear"`` (1x1 conv + bilinear) or ``"transpose"`` (2x2 transposed conv).

    ``encode`` returns the ``depth + 1`` encoder maps (channels in ``encoder_channels``), the
    last being the bottleneck; ``encoder`` is the ``UNetEncoder``.
    """

    model_name = "unet"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 4,
        width: int = 32,
        max_width: int | None = None,
        dropout: float = 0.0,
        padding_mode: PaddingMode = "zeros",
        block: BlockType = "conv",
        groups: int = 4,
        upsample: Literal["bilinear", "transpose"] = "bilinear",
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            depth=depth,
            width=width,
            max_width=max_width,
            dropout=dropout,
            padding_mode=padding_mode,
            block=block,
            groups=groups,
            upsample=upsample,
        )
        check_int("depth", depth, 1)
        check_int("width", width, 1)
        if max_width is not None:
            check_int("max_width", max_width, 1)
        check_probability("dropout", dropout)
        check_choice("padding_mode", padding_mode, PADDING_MODES)
        check_choice("block", block, BLOCK_TYPES)
        check_int("groups", groups, 1)
        check_choice("upsample", upsample, UPSAMPLE_MODES)

        cap = max_width if max_width is not None else width * 2**depth
        channels = [min(width * 2**i, cap) for i in range(depth + 1)]
        self.encoder_channels = channels
        self.output_stride = 2**depth
        common = dict(padding_mode=padding_mode, block=block, groups=groups)
        self.encoder = UNetEncoder(in_channels, channels, dropout=dropout, **common)
        self.decoder = nn.ModuleList(
            UpBlock(channels[i + 1], channels[i], upsample=upsample, dropout=dropout, **common)
            for i in reversed(range(depth))
        )
        self.classifier = PixelClassifier(channels[0], num_classes)
        init_weights(self)

    def _encode(self, x: Tensor) -> list[Tensor]:
        return self.encoder(x)

    def _decode(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        for up, skip in zip(self.decoder, reversed(features[:-1])):
            x = up(x, skip)
        return self.classifier(x)
