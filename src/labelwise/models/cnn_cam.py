"""A CNN multi-label classifier whose class activation maps localise the tagged classes (CAM,
Zhou et al. CVPR 2016), on a pretrained encoder, for weak supervision from image-level tags.

``CNNCAMClassifier(num_classes, encoder, weights, output_stride)``: the encoder's last stage
(``[B, C, h, w]`` at ``output_stride``, 16 or 8 by dilation) -> global average pooling -> a linear
classifier ``(W [K, C], b [K])``. Because pooling and the classifier are both linear, the
classifier applied at every position gives the maps whose average is the logit:
``scores_k = mean_{ij} (W_k . f_ij) + b_k``. ``forward(images [B, 3, H, W] in [0, 1])`` returns a
:class:`CNNCAMOutput` with those ``scores [B, K]`` and ``patch_cams [B, K, h, w] = W . f`` (the
CAMs before ``relu``; the bias, a per-class constant, is left out). The encoder normalises its
input itself (the weights' convention) and covers the image with ``ceil(H / s) x ceil(W / s)``
positions.

Train with :func:`cam_loss` (the multi-label soft-margin loss of the scores against ``[B, K]``
tags); the encoder is pretrained, the classifier new (:meth:`CNNCAMClassifier.is_new_parameter`).
A pretrained encoder's BatchNorm layers stay in eval mode through ``train()`` (their ImageNet
statistics kept while the weights train; a random-init encoder, ``weights=None``, trains them):
the TF-converted ``imagenet`` weights have folded BatchNorm, whose batch statistics in train mode
differ wholly from the running ones (a classifier fine-tuned in train mode predicted every tag
present in eval mode), and tag batches are small.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.models.encoders import batchnorm_to_eval, build_encoder

__all__ = ["CNNCAMClassifier", "CNNCAMOutput", "cam_loss"]


class CNNCAMOutput(NamedTuple):
    """What :meth:`CNNCAMClassifier.forward` returns (module docstring)."""

    scores: Tensor
    patch_cams: Tensor
    features: Tensor


class CNNCAMClassifier(nn.Module):
    """Global-average-pooled multi-label classifier on a CNN encoder (module docstring).

    Args:
        num_classes: ``K``.
        encoder: encoder architecture (``labelwise.models.encoders.ENCODERS``).
        weights: its pretrained weights (``imagenet``, ``mobilenet_v2_imagenet``, a file) or None.
        output_stride: 16 or 8 (the last stage(s) dilated instead of strided).
    """

    def __init__(self, num_classes: int, encoder: str = "mobilenet_v2", weights: str | None = "imagenet",
                 output_stride: int = 16) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16 for CAMs, got {output_stride}")
        self.encoder, convention = build_encoder(encoder, weights, output_stride=output_stride)
        self.encoder_name, self.weights_name, self.output_stride = encoder, weights, output_stride
        self.convention = convention.name
        self.num_classes = num_classes
        self.register_buffer("pixel_mean", torch.tensor(convention.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(convention.std).view(1, 3, 1, 1), persistent=False)
        channels = int(self.encoder.channels[-1])
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    @property
    def cam_stride(self) -> int:
        """Pixels per CAM position."""
        return self.output_stride

    def architecture(self) -> dict[str, Any]:
        """What rebuilds this classifier without its weights (``model.json``)."""
        return {"type": "cnn_cam", "num_classes": self.num_classes, "encoder": self.encoder_name,
                "weights": self.weights_name, "output_stride": self.output_stride}

    def is_new_parameter(self, name: str) -> bool:
        """Whether ``name`` (as in ``named_parameters()``) is the new classifier, not the pretrained encoder."""
        return name.startswith("classifier.")

    def train(self, mode: bool = True) -> "CNNCAMClassifier":
        super().train(mode)
        if self.weights_name is not None:  # pretrained statistics are kept; a random-init encoder learns its own
            batchnorm_to_eval(self.encoder)
        return self

    def forward(self, images: Tensor) -> CNNCAMOutput:
        """``images [B, 3, H, W]`` in [0, 1] -> :class:`CNNCAMOutput`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {list(images.shape)}")
        features = self.encoder((images - self.pixel_mean) / self.pixel_std)[-1]
        cams = F.conv2d(features, self.classifier.weight.to(features.dtype))
        scores = cams.float().mean((2, 3)) + self.classifier.bias.float()
        return CNNCAMOutput(scores, cams, features)


def cam_loss(output: CNNCAMOutput, tags: Tensor) -> Tensor:
    """Multi-label soft-margin loss of ``output.scores`` against ``tags [B, K]`` (0/1)."""
    return F.multilabel_soft_margin_loss(output.scores.float(), tags.float())
