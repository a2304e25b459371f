"""Weak supervision from image-level tags (MCTformer): tags -> multi-class-token ViT -> CAMs ->
pseudo-masks -> a segmentation network. In progress: tag files and tags from masks
(``labelwise.data.tags``), the multi-class-token ViT (``labelwise.models.mctformer``) and the
CAMs (``cams``) exist; training, pseudo-masks and the ``labelwise weak`` CLI follow.
"""

from labelwise.methods.weak.cams import CAMConfig, class_activation_maps, refine_with_affinity

__all__ = ["CAMConfig", "class_activation_maps", "refine_with_affinity"]
