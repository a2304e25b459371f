"""Base class of the segmentation models built on a pretrained CNN encoder (U-Net, DeepLabV3+).

It builds the encoder named by the ``encoder*`` options (``labelwise.models.encoders``), loads its
weights, and normalises images with the weights' own convention (``[-1, 1]`` for the TF-converted
MobileNetV2, ImageNet mean/std for torchvision's), so the caller always passes RGB in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch

from labelwise.models.base import SegmentationModel
from labelwise.models.encoders import build_encoder
from labelwise.models.pretrained import known_weights


class EncoderSegmentationModel(SegmentationModel):
    """A :class:`SegmentationModel` whose ``encoder`` is a pretrained CNN (``build_encoder``).

    Subclasses call ``super().__init__(num_classes, in_channels, encoder, encoder_weights,
    encoder_convention, encoder_output_stride, **their_options)`` and then build their decoder on
    ``self.encoder.channels`` (per stage) and ``self.encoder.strides``. ``encode`` returns the five
    encoder maps (strides 2, 4, 8, 16, 32, or dilated to 16 / 8).

    ``config()`` records ``encoder_convention`` resolved (``tf`` / ``torchvision``), so an exported
    model is rebuilt with the input convention it was trained with whatever file is around.
    """

    def __init__(self, num_classes: int, in_channels: int, encoder: str, encoder_weights: str | None,
                 encoder_convention: str, encoder_output_stride: int, **options: Any) -> None:
        built, convention = build_encoder(encoder, encoder_weights, encoder_convention, encoder_output_stride,
                                          in_channels)
        super().__init__(num_classes, in_channels, encoder=encoder, encoder_weights=encoder_weights,
                         encoder_convention=convention.name, encoder_output_stride=encoder_output_stride,
                         **options)
        self.encoder = built
        self.convention = convention
        known = known_weights(encoder, encoder_weights)
        #: the encoder starts from weights whose BatchNorm is folded (``pretrained.NamedWeights``)
        self.folded_batchnorm = bool(known and known.folded_batchnorm)
        # the padding multiple: every stride of the encoder divides its output stride
        self.output_stride = encoder_output_stride
        if in_channels == 3:
            mean, std = convention.mean, convention.std
        else:  # extra bands (e.g. near infrared) get the mean of the RGB statistics
            mean = (*convention.mean, *[sum(convention.mean) / 3] * (in_channels - 3))[:in_channels]
            std = (*convention.std, *[sum(convention.std) / 3] * (in_channels - 3))[:in_channels]
        self.pixel_mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.pixel_std = torch.tensor(std).view(1, -1, 1, 1)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x)


__all__ = ["EncoderSegmentationModel"]
