"""Convolution building blocks shared by U-Net and U²-Net.

- ``ConvBNReLU``: conv (bias=False) -> BatchNorm -> ReLU, "same" padding for any dilation.
- ``channel_shuffle`` / ``ChannelShuffle``: ShuffleNet's channel permutation.
- ``GroupedShuffleBlock``: ShuffleNet-style unit, a cheap replacement for ``DoubleConv`` (U-Net)
  and for the 3x3 conv inside RSU blocks (U²-Net).
- ``DoubleConv``: the U-Net stage, two ``ConvBNReLU`` or one ``GroupedShuffleBlock``.

Padding: ``padding_mode="reflect"`` falls back to ``"replicate"`` on feature maps too small to
reflect (PyTorch needs pad < size; deep stages of small images reach 1x1 maps).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.models.base import check_choice, check_int, check_probability

PaddingMode = Literal["zeros", "reflect"]
BlockType = Literal["conv", "shuffle"]
PADDING_MODES = ("zeros", "reflect")
BLOCK_TYPES = ("conv", "shuffle")


class PaddedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose ``"reflect"`` padding becomes ``"replicate"`` on maps smaller than or
    equal to the padding (where reflection is undefined). Same parameters as ``nn.Conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode == "zeros":
            return super().forward(x)
        pad_h, pad_w = self.padding  # type: ignore[misc]
        mode = self.padding_mode
        if mode == "reflect" and (x.shape[-2] <= pad_h or x.shape[-1] <= pad_w):
            mode = "replicate"
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=mode)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ConvBNReLU(nn.Sequential):
    """``[B, in, H, W] -> [B, out, H/stride, W/stride]``: conv (no bias) -> BN -> ReLU.

    Padding is ``dilation * (kernel_size - 1) // 2`` ("same" for odd kernels). ``relu=False``
    leaves out the activation (ConvBN). Submodules: ``conv``, ``bn``, ``relu``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: PaddingMode = "zeros",
        relu: bool = True,
    ) -> None:
        check_choice("padding_mode", padding_mode, PADDING_MODES)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = PaddedConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
            groups=groups,
            bias=False,
            padding_mode=padding_mode,
        )
        layers["bn"] = nn.BatchNorm2d(out_channels)
        if relu:
            layers["relu"] = nn.ReLU(inplace=True)
        super().__init__(layers)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet channel shuffle of ``x [B, C, H, W]`` (same shape).

    Seeing the channels as ``groups`` groups of ``C / groups``, output channel
    ``j = i * groups + k`` is input channel ``k * (C / groups) + i``: channel ``i`` of every
    group, then channel ``i + 1`` of every group, ... Raises ``ValueError`` if ``groups`` does
    not divide C.
    """
    batch, channels, height, width = x.shape
    if groups < 1 or channels % groups != 0:
        raise ValueError(f"channel_shuffle: {channels} channels cannot form {groups} equal groups")
    if groups == 1:
        return x
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


class ChannelShuffle(nn.Module):
    """Module form of ``channel_shuffle``: ``[B, C, H, W] -> [B, C, H, W]``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def fit_groups(groups: int, *channels: int) -> int:
    """Largest group count ``<= groups`` dividing every channel count in ``channels``
    (1 when none larger does, e.g. for a 3-channel RGB input)."""
    for g in range(max(groups, 1), 0, -1):
        if all(c % g == 0 for c in channels):
            return g
    return 1


class GroupedShuffleBlock(nn.Module):
    """ShuffleNet-style unit ``[B, in, H, W] -> [B, out, H, W]``.

    grouped ``kernel_size`` conv (in -> mid) + BN + ReLU, channel shuffle, depthwise 3x3 conv
    (with ``dilation``) + BN, grouped 1x1 conv (mid -> out) + BN, identity residual when
    ``in == out``, ReLU. ``mid`` defaults to ``out``.

    Channel counts not divisible by ``groups``: each grouped conv falls back to the largest
    group count ``<= groups`` dividing both its channel counts (see ``fit_groups``); with an
    RGB input the first conv is dense. ``kernel_size=3`` gives the receptive field of two 3x3
    convs (U-Net ``DoubleConv``), ``kernel_size=1`` that of one dilated 3x3 (RSU conv).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int = 4,
        mid_channels: int | None = None,
        kernel_size: int = 1,
        dilation: int = 1,
        padding_mode: PaddingMode = "zeros",
    ) -> None:
        super().__init__()
        check_int("groups", groups, 1)
        mid = mid_channels or out_channels
        first_groups = fit_groups(groups, in_channels, mid)
        last_groups = fit_groups(groups, mid, out_channels)
        self.reduce = ConvBNReLU(
            in_channels, mid, kernel_size, groups=first_groups, padding_mode=padding_mode
        )
        self.shuffle = ChannelShuffle(first_groups)
        self.depthwise = ConvBNReLU(
            mid, mid, 3, dilation=dilation, groups=mid, padding_mode=padding_mode, relu=False
        )
        self.expand = ConvBNReLU(mid, out_channels, 1, groups=last_groups, relu=False)
        self.residual = in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand(self.depthwise(self.shuffle(self.reduce(x))))
        if self.residual:
            y = y + x
        return F.relu(y)


class DoubleConv(nn.Sequential):
    """U-Net stage ``[B, in, H, W] -> [B, out, H, W]``.

    ``block="conv"``: two ``ConvBNReLU`` 3x3 (in -> mid -> out); ``block="shuffle"``: one
    ``GroupedShuffleBlock`` with a grouped 3x3 first conv (same receptive field, several
    times fewer FLOPs). ``dropout > 0`` adds ``Dropout2d`` on the output.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: int | None = None,
        dropout: float = 0.0,
        padding_mode: PaddingMode = "zeros",
        block: BlockType = "conv",
        groups: int = 4,
    ) -> None:
        check_choice("block", block, BLOCK_TYPES)
        dropout = check_probability("dropout", dropout)
        mid = mid_channels or out_channels
        layers: list[nn.Module]
        if block == "conv":
            layers = [
                ConvBNReLU(in_channels, mid, padding_mode=padding_mode),
                ConvBNReLU(mid, out_channels, padding_mode=padding_mode),
            ]
        else:
            layers = [
                GroupedShuffleBlock(
                    in_channels, out_channels, groups, mid, kernel_size=3, padding_mode=padding_mode
                )
            ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) conv weights, zero biases, BatchNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


__all__ = [
    "BLOCK_TYPES",
    "PADDING_MODES",
    "ChannelShuffle",
    "ConvBNReLU",
    "DoubleConv",
    "GroupedShuffleBlock",
    "PaddedConv2d",
    "channel_shuffle",
    "fit_groups",
    "init_weights",
]
