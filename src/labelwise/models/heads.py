"""Heads: the pixel classifier shared by the segmentation models, and the code / projection
heads of unsupervised segmentation on frozen features."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

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


class ProjectionHead(nn.Module):
    """Codes of frozen backbone features for unsupervised segmentation (STEGO / HP head).

    ``Dropout2d(dropout)`` on the features ``[B, in_channels, h, w]``, then the sum of a linear
    1x1 branch and a 1x1-ReLU-1x1 branch (hidden width ``in_channels``) to ``dim`` channels:
    ``[B, dim, h, w]``. Dropout acts in training mode only.
    """

    def __init__(self, in_channels: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_channels, self.dim = in_channels, dim
        self.dropout = check_probability("dropout", dropout)
        self.linear = nn.Conv2d(in_channels, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(in_channels, dim, 1))

    def forward(self, features: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            features = F.dropout2d(features, self.dropout, training=True)
        return self.linear(features) + self.nonlinear(features)


class ContrastProjection(nn.Module):
    """``z = normalize(Linear(dim, dim)(code))`` per location: ``[B, dim, h, w]`` -> ``[B, dim, h, w]``
    with unit-norm channel vectors (HP's projection before the contrastive loss)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Conv2d(dim, dim, 1)

    def forward(self, code: Tensor) -> Tensor:
        return F.normalize(self.linear(code), dim=1)
