"""MobileNetV2 (Sandler et al., 2018) in torchvision's key layout, with TF 'SAME' padding and
dilation.

``MobileNetV2`` is the ImageNet classifier (``features.0`` ... ``features.18`` + ``classifier.1``),
so torchvision's ``mobilenet_v2-b0353104.pth`` and ``../shared/weights/mobilenet_v2_imagenet.pth``
load into it with strict names and shapes. ``MobileNetV2Encoder`` is its ``features`` alone, cut
into five stages for decoders (smp's split):

=====  ==================  ======  ========
stage  layers              stride  channels
=====  ==================  ======  ========
1      ``features[0:2]``   2       16
2      ``features[2:4]``   4       24
3      ``features[4:7]``   8       32
4      ``features[7:14]``  16      96
5      ``features[14:19]`` 32      1280
=====  ==================  ======  ========

Padding: ``"symmetric"`` is PyTorch's ``padding = dilation * (k - 1) // 2`` (torchvision's
weights); ``"tf_same"`` is TensorFlow's 'SAME' rule (the weights converted from TF-slim): a
stride-2 conv pads ``total = max((ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)`` pixels, the
smaller half on the top/left, so an even input gets nothing on top/left and one row/column on
the bottom/right. Stride-1 convs with odd kernels pad the same way under both rules.

``output_stride`` 16 or 8 replaces the stride of the last one or two stride-2 blocks by 1 and
dilates every later 3x3 convolution (the block that loses its stride keeps the previous rate,
as in TF's DeepLab and torchvision's segmentation models), so weights stay valid.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PaddingRule = Literal["symmetric", "tf_same"]
PADDING_RULES = ("symmetric", "tf_same")
OUTPUT_STRIDES = (8, 16, 32)

#: (expansion t, output channels c, repeats n, first stride s) of torchvision / the paper.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
#: ``features`` index ranges of the five encoder stages (strides 2, 4, 8, 16, 32).
STAGE_SLICES = ((0, 2), (2, 4), (4, 7), (7, 14), (14, 19))
STAGE_CHANNELS = (16, 24, 32, 96, 1280)
LAST_CHANNELS = 1280


def same_padding(size: int, kernel_size: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME' padding ``(before, after)`` of one spatial dimension of ``size`` pixels."""
    effective = dilation * (kernel_size - 1) + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class PaddedConv(nn.Conv2d):
    """``nn.Conv2d`` (no bias) with symmetric or TF 'SAME' padding (module docstring).

    Only strided convs need the dynamic 'SAME' computation; the others use the fixed symmetric
    padding, which is identical for them.

    A dilated depthwise conv runs in fp32 on NCHW tensors, outside autocast: on this CPU build
    (torch 2.13, oneDNN) its weight gradient under bf16 autocast is wrong for some map sizes
    (relative error above 1, up to 1e30, at 22x30 with rate 2 or 6; exact at 11x15), which sent
    DeepLabV3+ training to inf / NaN at full resolution. Dilated convs only see the small deep
    maps and are depthwise, so fp32 costs little there.
    ``tests/test_mobilenet_v2.py`` checks the gradient against fp32.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, padding_rule: PaddingRule = "symmetric") -> None:
        self.dynamic_same = padding_rule == "tf_same" and stride > 1
        self.dilated_depthwise = dilation > 1 and groups > 1
        padding = 0 if self.dynamic_same else dilation * (kernel_size - 1) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.dilated_depthwise:
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = F.conv2d(x.float().contiguous(), self.weight.float().contiguous(), None, self.stride,
                               self.padding, self.dilation, self.groups)
            return out.to(x.dtype)
        if self.dynamic_same:
            top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
            left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class ConvBNReLU6(nn.Sequential):
    """torchvision's ``Conv2dNormActivation``: conv ``0`` -> BatchNorm ``1`` -> ReLU6 ``2``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, groups: int = 1, padding_rule: PaddingRule = "symmetric") -> None:
        super().__init__(
            PaddedConv(in_channels, out_channels, kernel_size, stride, dilation, groups, padding_rule),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """``[B, in, H, W] -> [B, out, H / stride, W / stride]``: 1x1 expansion (unless ``t = 1``),
    3x3 depthwise (``stride``, ``dilation``), linear 1x1 projection; identity shortcut when the
    shape is kept. Submodule ``conv`` holds the layers under torchvision's indices."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
                 dilation: int = 1, padding_rule: PaddingRule = "symmetric") -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, 1))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, dilation, groups=hidden, padding_rule=padding_rule),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


def build_features(padding_rule: PaddingRule = "symmetric", output_stride: int = 32,
                   in_channels: int = 3) -> nn.Sequential:
    """torchvision's ``features`` (19 modules, indices ``0`` ... ``18``) for ``output_stride``
    32, 16 or 8 (module docstring)."""
    if padding_rule not in PADDING_RULES:
        raise ValueError(f"padding_rule must be one of {PADDING_RULES}, got {padding_rule!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    layers: list[nn.Module] = [ConvBNReLU6(in_channels, 32, 3, stride=2, padding_rule=padding_rule)]
    current_stride, dilation, channels = 2, 1, 32
    for expand_ratio, out_channels, repeats, first_stride in INVERTED_RESIDUAL_SETTING:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            block_dilation = dilation
            if stride > 1 and current_stride >= output_stride:
                dilation *= stride  # later blocks see the rate; this one keeps the previous rate
                stride = 1
            else:
                current_stride *= stride
            layers.append(InvertedResidual(channels, out_channels, stride, expand_ratio, block_dilation,
                                           padding_rule))
            channels = out_channels
    layers.append(ConvBNReLU6(channels, LAST_CHANNELS, 1))
    return nn.Sequential(*layers)


def init_mobilenet(module: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal (fan_out) convs, BN 1 / 0, linear N(0, 0.01)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class MobileNetV2(nn.Module):
    """The ImageNet classifier: normalised images ``[B, 3, H, W]`` -> logits ``[B, num_classes]``.

    The input must already follow the weights' convention (``[-1, 1]`` for TF-converted weights,
    ImageNet mean/std for torchvision's); ``labelwise.models.pretrained`` records which.
    """

    def __init__(self, num_classes: int = 1000, padding_rule: PaddingRule = "symmetric",
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.features = build_features(padding_rule)
        self.classifier = nn.Sequential(OrderedDict([("0", nn.Dropout(dropout)),
                                                     ("1", nn.Linear(LAST_CHANNELS, num_classes))]))
        init_mobilenet(self)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(pooled)


class MobileNetV2Encoder(nn.Module):
    """``features`` of :class:`MobileNetV2` as a five-stage encoder.

    ``forward(x [B, 3, H, W])`` with H, W multiples of 32 (of ``output_stride`` at least) returns
    five maps, stage ``i`` (0-based) of shape ``[B, channels[i], H / strides[i], W / strides[i]]``
    with ``strides = (2, 4, 8, min(16, output_stride), output_stride)``.
    """

    def __init__(self, padding_rule: PaddingRule = "symmetric", output_stride: int = 32,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.features = build_features(padding_rule, output_stride, in_channels)
        self.padding_rule = padding_rule
        self.output_stride = output_stride
        self.channels = STAGE_CHANNELS
        self.strides = (2, 4, 8, min(16, output_stride), output_stride)
        init_mobilenet(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for start, stop in STAGE_SLICES:
            for index in range(start, stop):
                x = self.features[index](x)
            outputs.append(x)
        return outputs


__all__ = [
    "INVERTED_RESIDUAL_SETTING",
    "PADDING_RULES",
    "STAGE_CHANNELS",
    "STAGE_SLICES",
    "InvertedResidual",
    "MobileNetV2",
    "MobileNetV2Encoder",
    "PaddedConv",
    "build_features",
    "same_padding",
]
