"""U²-Net (Qin et al., 2020): a U-Net of residual U-blocks (RSU), with deep supervision.

RSU-L (``RSU(height=L)``): input conv (in -> out), then a small U-Net of 3x3 convs on ``mid``
channels with ``L - 2`` max-pools, a dilation-2 conv at the bottom, bilinear upsampling to each
skip's actual size, and a residual connection ``out = U(x_in) + x_in``. RSU-4F
(``dilated=True``) replaces pooling by dilations 1, 2, 4, 8 (for low-resolution stages).

Arrangement (as published): encoder En_1..En_6 = RSU-7, RSU-6, RSU-5, RSU-4, RSU-4F, RSU-4F
with 2x max-pool between stages; decoder De_5..De_1 = RSU-4F, RSU-4, RSU-5, RSU-6, RSU-7, each
taking ``[upsampled deeper map, skip]``. Side outputs: a 3x3 conv to ``num_classes`` logits on
De_1..De_5 and En_6, upsampled to the input size; fused logits = 1x1 conv over the
concatenation of the six side logits (initialised to their mean). Multi-class: raw logits.

Output: in eval mode, the fused logits ``[B, C, H, W]``; in training mode a
``DeepSupervisionOutput(logits=fused, side_logits=[side_1, ..., side_6])`` (finest first, all
``[B, C, H, W]``) so that the loss can supervise every side output.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.models.base import (
    DeepSupervisionOutput,
    ModelOutput,
    SegmentationModel,
    check_choice,
    check_int,
    check_probability,
    register_model,
)
from labelwise.models.blocks import (
    BLOCK_TYPES,
    PADDING_MODES,
    BlockType,
    ConvBNReLU,
    GroupedShuffleBlock,
    PaddingMode,
    init_weights,
)
from labelwise.models.heads import PixelClassifier

# (height, dilated, mid_channels, out_channels) of each stage; decoder listed deep to shallow.
StageSpec = tuple[int, bool, int, int]
VARIANTS: dict[str, dict[str, list[StageSpec]]] = {
    "full": {
        "encoder": [
            (7, False, 32, 64),
            (6, False, 32, 128),
            (5, False, 64, 256),
            (4, False, 128, 512),
            (4, True, 256, 512),
            (4, True, 256, 512),
        ],
        "decoder": [
            (4, True, 256, 512),
            (4, False, 128, 256),
            (5, False, 64, 128),
            (6, False, 32, 64),
            (7, False, 16, 64),
        ],
    },
    "small": {  # U²-Net† (lite): mid 16, out 64 everywhere
        "encoder": [(7, False, 16, 64), (6, False, 16, 64), (5, False, 16, 64),
                    (4, False, 16, 64), (4, True, 16, 64), (4, True, 16, 64)],
        "decoder": [(4, True, 16, 64), (4, False, 16, 64), (5, False, 16, 64),
                    (6, False, 16, 64), (7, False, 16, 64)],
    },
}


def conv_unit(
    in_channels: int,
    out_channels: int,
    dilation: int = 1,
    block: BlockType = "conv",
    groups: int = 4,
    padding_mode: PaddingMode = "zeros",
) -> nn.Module:
    """The RSU conv ``[B, in, H, W] -> [B, out, H, W]``: 3x3 ``ConvBNReLU`` with ``dilation``
    (``block="conv"``) or a ``GroupedShuffleBlock`` with a 1x1 grouped first conv and a
    dilated depthwise 3x3 (``block="shuffle"``, same receptive field)."""
    if block == "shuffle":
        return GroupedShuffleBlock(
            in_channels, out_channels, groups, dilation=dilation, padding_mode=padding_mode
        )
    return ConvBNReLU(in_channels, out_channels, 3, dilation=dilation, padding_mode=padding_mode)


def upsample_like(x: Tensor, reference: Tensor) -> Tensor:
    """Bilinearly resize ``x [B, C, h, w]`` to the spatial size of ``reference`` (no-op if equal)."""
    if x.shape[-2:] == reference.shape[-2:]:
        return x
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block RSU-``height`` (RSU-``height``F when ``dilated``):
    ``[B, in, H, W] -> [B, out, H, W]`` for any H, W (pooling uses ``ceil_mode``, upsampling
    goes to each skip's actual size)."""

    def __init__(
        self,
        height: int,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        dilated: bool = False,
        block: BlockType = "conv",
        groups: int = 4,
        padding_mode: PaddingMode = "zeros",
    ) -> None:
        super().__init__()
        check_int("height", height, 2)
        self.dilated = dilated

        def unit(c_in: int, c_out: int, dilation: int) -> nn.Module:
            return conv_unit(c_in, c_out, dilation, block, groups, padding_mode)

        levels = range(1, height)  # encoder/decoder levels 1 .. height-1; the bottom is level L
        dilation = [2 ** (i - 1) if dilated else 1 for i in levels]
        self.conv_in = unit(in_channels, out_channels, 1)
        self.down = nn.ModuleList(
            unit(out_channels if i == 1 else mid_channels, mid_channels, d)
            for i, d in zip(levels, dilation)
        )
        self.bottom = unit(mid_channels, mid_channels, 2 ** (height - 1) if dilated else 2)
        self.up = nn.ModuleList(  # deep to shallow: levels height-1 .. 1
            unit(2 * mid_channels, out_channels if i == 1 else mid_channels, d)
            for i, d in reversed(list(zip(levels, dilation)))
        )
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        x_in = self.conv_in(x)
        skips = []
        h = x_in
        for i, conv in enumerate(self.down):
            if i > 0 and not self.dilated:
                h = self.pool(h)
            h = conv(h)
            skips.append(h)
        h = self.bottom(h)
        for conv, skip in zip(self.up, reversed(skips)):
            h = conv(torch.cat([upsample_like(h, skip), skip], dim=1))
        return h + x_in


class U2NetEncoder(nn.Module):
    """En_1..En_6: ``[B, in, H, W]`` -> six maps, map ``i`` at ``H / 2**i`` (H, W multiples of
    32), 2x max-pool (ceil mode) between stages."""

    def __init__(
        self,
        in_channels: int,
        specs: list[StageSpec],
        block: BlockType = "conv",
        groups: int = 4,
        padding_mode: PaddingMode = "zeros",
    ) -> None:
        super().__init__()
        inputs = [in_channels] + [spec[3] for spec in specs[:-1]]
        self.stages = nn.ModuleList(
            RSU(height, c_in, mid, out, dilated, block, groups, padding_mode)
            for c_in, (height, dilated, mid, out) in zip(inputs, specs)
        )
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.pool(x))
            features.append(x)
        return features


@register_model("u2net")
class U2Net(SegmentationModel):
    """U²-Net: images ``[B, in_channels, H, W]`` in [0, 1] -> logits ``[B, num_classes, H, W]``
    (eval) or ``DeepSupervisionOutput`` (training; see the module docstring).

    Args:
        num_classes: number of output classes.
        in_channels: image channels (3 for RGB).
        variant: ``"full"`` (paper channels, ~44M parameters) or ``"small"`` (U²-Net†, mid 16 /
            out 64 everywhere, ~1.1M parameters).
        block: ``"conv"`` (3x3 ConvBNReLU in RSU blocks) or ``"shuffle"`` (GroupedShuffleBlock).
        groups: groups of the shuffle block's grouped convs.
        padding_mode: ``"zeros"`` or ``"reflect"`` padding of the 3x3 convs.
        dropout: ``Dropout2d`` probability on En_6 and every decoder stage output (the maps the
            side heads and the next decoder stage read).

    ``output_stride = 32``; ``encode`` returns En_1..En_6 (``encoder`` is the ``U2NetEncoder``).
    """

    model_name = "u2net"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        variant: Literal["full", "small"] = "full",
        block: BlockType = "conv",
        groups: int = 4,
        padding_mode: PaddingMode = "zeros",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            variant=variant,
            block=block,
            groups=groups,
            padding_mode=padding_mode,
            dropout=dropout,
        )
        check_choice("variant", variant, tuple(VARIANTS))
        check_choice("block", block, BLOCK_TYPES)
        check_int("groups", groups, 1)
        check_choice("padding_mode", padding_mode, PADDING_MODES)
        check_probability("dropout", dropout)

        self.output_stride = 32
        encoder_specs, decoder_specs = VARIANTS[variant]["encoder"], VARIANTS[variant]["decoder"]
        self.encoder_channels = [spec[3] for spec in encoder_specs]
        self.encoder = U2NetEncoder(in_channels, encoder_specs, block, groups, padding_mode)

        deeper = encoder_specs[-1][3]
        decoder = []
        for skip_spec, (height, dilated, mid, out) in zip(encoder_specs[-2::-1], decoder_specs):
            decoder.append(
                RSU(height, deeper + skip_spec[3], mid, out, dilated, block, groups, padding_mode)
            )
            deeper = out
        self.decoder = nn.ModuleList(decoder)  # De_5 .. De_1

        side_channels = [spec[3] for spec in reversed(decoder_specs)] + [encoder_specs[-1][3]]
        self.side = nn.ModuleList(  # side_1 (De_1) .. side_5 (De_5), side_6 (En_6)
            PixelClassifier(c, num_classes, kernel_size=3) for c in side_channels
        )
        self.fuse = nn.Conv2d(len(side_channels) * num_classes, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        init_weights(self)
        self._init_fuse_as_mean()

    @torch.no_grad()
    def _init_fuse_as_mean(self) -> None:
        """Start the fusion conv as the mean of the side logits (class c reads class c)."""
        num_sides = len(self.side)
        self.fuse.weight.zero_()
        self.fuse.bias.zero_()
        for k in range(num_sides):
            for c in range(self.num_classes):
                self.fuse.weight[c, k * self.num_classes + c] = 1.0 / num_sides

    def _encode(self, x: Tensor) -> list[Tensor]:
        return self.encoder(x)

    def _decode(self, features: list[Tensor]) -> ModelOutput:
        h = self.dropout(features[-1])
        side_features = [h]  # En_6, then De_5 .. De_1
        for stage, skip in zip(self.decoder, reversed(features[:-1])):
            h = self.dropout(stage(torch.cat([upsample_like(h, skip), skip], dim=1)))
            side_features.append(h)
        side_features.reverse()  # De_1 .. De_5, En_6
        sides = [upsample_like(head(f), features[0]) for head, f in zip(self.side, side_features)]
        fused = self.fuse(torch.cat(sides, dim=1))
        if self.training:
            return DeepSupervisionOutput(fused, sides)
        return fused


register_model("u2net_small", variant="small")(U2Net)
