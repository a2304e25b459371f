"""Weak supervision from image-level tags (MCTformer): tags -> multi-class-token ViT -> CAMs ->
pseudo-masks -> a segmentation network. In progress: tag files and tags from masks
(``labelwise.data.tags``), the multi-class-token ViT (``labelwise.models.mctformer``) and the
CAMs (``cams``), the pseudo-mask rule (``pseudo_masks``), the typed configuration (``config``) and
stage 1, the classifier training on tags (``train``: :func:`train_classifier`) exist; the CAM and
pseudo-mask stages over a dataset, the second stage and the ``labelwise weak`` CLI follow.
"""

from labelwise.methods.weak.cams import CAMConfig, class_activation_maps, refine_with_affinity
from labelwise.methods.weak.config import WeakConfig
from labelwise.methods.weak.pseudo_masks import PseudoMaskConfig, pseudo_masks
from labelwise.methods.weak.train import load_classifier, save_classifier, train_classifier

__all__ = ["CAMConfig", "PseudoMaskConfig", "WeakConfig", "class_activation_maps", "load_classifier",
           "pseudo_masks", "refine_with_affinity", "save_classifier", "train_classifier"]
