"""Pixel classifier head shared by the segmentation models."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from labelwise.models.base import check_probability


class PixelClassifier(nn.Sequential):
    """Features ``[B, in_channels, H, W]`` -> logits ``[B, num_classes, H, W]``.

    Optional ``Dropout2d(dropout)``, then a ``kernel_size`` conv with bias ("same" padding;
    1x1 by default, 3x3 for U²-Net side outputs). Submodules: ``dropout``, ``conv`` (state-dict
    keys do not depend on ``dropout``).
    """

    def __init__(
        self, in_channels: int, num_classes: int, dropout: float = 0.0, kernel_size: int = 1
    ) -> None:
        dropout = check_probability("dropout", dropout)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if dropout > 0:
            layers["dropout"] = nn.Dropout2d(dropout)
        layers["conv"] = nn.Conv2d(
            in_channels, num_classes, kernel_size, padding=kernel_size // 2, bias=True
        )
        super().__init__(layers)
