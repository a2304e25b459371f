"""Weak supervision from image-level tags: tags -> a classifier (multi-class-token ViT, CNN CAMs
or the CNN + Transformer hybrid, ``classifiers``) -> CAMs -> (pixel-adaptive refinement) ->
pseudo-masks -> a segmentation network: tag files and tags from masks (``labelwise.data.tags``),
the classifiers (``labelwise.models.mctformer``, ``labelwise.models.cnn_cam``) and their CAMs
(``cams``), the pseudo-mask rule (``pseudo_masks``), the typed configuration (``config``), stage
1, the classifier training on tags (``train``: :func:`train_classifier`), stages 2-3, CAMs and
pseudo-masks of a dataset written as a labelwise folder dataset (``stages``:
:func:`make_pseudo_masks`), and :func:`run`, every stage including the segmenter trained on the
pseudo-masks (``pipeline``).
"""

from labelwise.methods.weak.cams import CAMConfig, class_activation_maps, refine_with_affinity
from labelwise.methods.weak.config import WeakConfig
from labelwise.methods.weak.data import TaggedImages
from labelwise.methods.weak.pipeline import run, tagged_items, write_stage
from labelwise.methods.weak.pseudo_masks import PseudoMaskConfig, pseudo_masks
from labelwise.methods.weak.stages import make_pseudo_masks
from labelwise.methods.weak.train import load_classifier, save_classifier, train_classifier

__all__ = ["CAMConfig", "PseudoMaskConfig", "TaggedImages", "WeakConfig", "class_activation_maps", "load_classifier",
           "make_pseudo_masks", "pseudo_masks", "refine_with_affinity", "run", "save_classifier",
           "tagged_items", "train_classifier", "write_stage"]
