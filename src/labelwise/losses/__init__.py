"""Loss functions. Supervised losses (CE, Dice, focal, Lovász, weighted sums, deep supervision) live in
:mod:`labelwise.losses.supervised`; unsupervised ones in :mod:`~labelwise.losses.hidden_positives`
(HP), :mod:`~labelwise.losses.stego` (STEGO correspondence) and :mod:`~labelwise.losses.clustering`
(PiCIE-style); pretraining ones in ``contrastive``, ``dino`` and ``rotation``."""

from labelwise.losses.clustering import ClusteringLoss, clustering_loss
from labelwise.losses.hidden_positives import HiddenPositiveLoss, HiddenPositiveLossConfig, hidden_positive_loss
from labelwise.losses.stego import StegoConfig, StegoLoss, stego_correspondence_loss
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
    "ClusteringLoss",
    "HiddenPositiveLoss",
    "HiddenPositiveLossConfig",
    "StegoConfig",
    "StegoLoss",
    "clustering_loss",
    "hidden_positive_loss",
    "stego_correspondence_loss",
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
