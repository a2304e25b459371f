"""Loss functions. Supervised losses (CE, Dice, focal, Lovász, weighted sums, deep supervision) live in
:mod:`labelwise.losses.supervised`."""

from labelwise.losses.supervised import (
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LovaszLoss,
    WeightedSumLoss,
    build_loss,
    cross_entropy,
    deep_supervision_loss,
    focal_loss,
    lovasz_softmax_loss,
    soft_dice_loss,
)

__all__ = [
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "LovaszLoss",
    "WeightedSumLoss",
    "build_loss",
    "cross_entropy",
    "deep_supervision_loss",
    "focal_loss",
    "lovasz_softmax_loss",
    "soft_dice_loss",
]
