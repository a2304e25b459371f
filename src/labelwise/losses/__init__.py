"""Loss functions. Supervised losses (CE, Dice, focal, weighted sums, deep supervision) live in
:mod:`labelwise.losses.supervised`."""

from labelwise.losses.supervised import (
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    WeightedSumLoss,
    build_loss,
    cross_entropy,
    deep_supervision_loss,
    focal_loss,
    soft_dice_loss,
)

__all__ = [
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "WeightedSumLoss",
    "build_loss",
    "cross_entropy",
    "deep_supervision_loss",
    "focal_loss",
    "soft_dice_loss",
]
