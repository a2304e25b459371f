"""Weak supervision from image-level tags (MCTformer): tags -> multi-class-token ViT -> CAMs ->
pseudo-masks -> a segmentation network. In progress: tag files and tags from masks
(``labelwise.data.tags``), the multi-class-token ViT (``labelwise.models.mctformer``) and the
CAMs (``cams``) and the pseudo-mask rule (``pseudo_masks``) exist; training, the second stage and
the ``labelwise weak`` CLI follow.
"""

from labelwise.methods.weak.cams import CAMConfig, class_activation_maps, refine_with_affinity
from labelwise.methods.weak.pseudo_masks import PseudoMaskConfig, pseudo_masks

__all__ = ["CAMConfig", "PseudoMaskConfig", "class_activation_maps", "pseudo_masks", "refine_with_affinity"]
