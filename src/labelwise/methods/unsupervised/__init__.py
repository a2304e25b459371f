"""Unsupervised segmentation on frozen self-supervised features (``labelwise unsupervised``).

Backbones (``features.backbone``): a ViT, the ImageNet MobileNetV2 or several joined by ``+``
(:mod:`labelwise.models.feature_backbones`). Methods (``UnsupervisedConfig.method``): ``hp``
(Hidden Positives, CVPR 2023: task-agnostic and task-specific global hidden positives, local
hidden positives, photometric consistency; the ``hp.task_specific`` / ``hp.local`` switches give
the paper's ablation rows; ``hp.specific_positives`` / ``hp.collapse_guard`` / ``hp.lambda_max``
guard it on weak backbones), ``stego`` (STEGO's correspondence loss), ``picie`` (a DeepCluster /
PiCIE-style clustering loss), ``kmeans`` (no training: k-means on the raw backbone features) and
``primaps`` (no head: class prototypes fitted by EM to per-image principal mask proposals).
Any run can then be refined by self-training (:func:`refine`: a segmenter trained on the run's
confident cluster predictions).

    from labelwise.config import load_config
    from labelwise.methods import unsupervised

    config = load_config(unsupervised.UnsupervisedConfig, None, ["data.dataset=synthetic"])
    result = unsupervised.train(config)                  # run_dir: head + centroids (no labels used)
    scores = unsupervised.probe(result.run_dir)          # cluster probe (Hungarian), linear probe, CRF
    refined = unsupervised.refine(result.run_dir)        # run_dir/refine/round1: a segmenter of the clusters
    labelwise.load(refined.final_model).predict(images)  # cluster ids (labelwise.inference; `labelwise predict`)

Modules: ``config``, ``data`` (five-crop / whole-image views, photometric copies), ``model``
(the head and its export as a ``clusters`` model folder), ``train``, ``primaps_fit``, ``probe``,
``refine``. Prediction, cluster-to-class matching with a few labeled images and CRF refinement
are those of every model folder: :mod:`labelwise.inference` (``labelwise predict RUN images/
--match-with labeled/``).
"""

from labelwise.methods.unsupervised.config import (
    METHODS,
    ClusteringSettings,
    FeatureConfig,
    HPSettings,
    PrimapsSettings,
    StegoSettings,
    UnsupervisedConfig,
    UnsupervisedEvalConfig,
)
from labelwise.methods.unsupervised.evaluate import evaluate_clusters, probe
from labelwise.methods.unsupervised.model import ExportedHead, UnsupervisedHead, load_head, save_head
from labelwise.methods.unsupervised.refine import RefineConfig, RefineResult, refine
from labelwise.methods.unsupervised.train import SELECTION_RULE, UnsupervisedResult, train

__all__ = [
    "METHODS",
    "SELECTION_RULE",
    "ClusteringSettings",
    "ExportedHead",
    "FeatureConfig",
    "HPSettings",
    "PrimapsSettings",
    "RefineConfig",
    "RefineResult",
    "StegoSettings",
    "UnsupervisedConfig",
    "UnsupervisedEvalConfig",
    "UnsupervisedHead",
    "UnsupervisedResult",
    "evaluate_clusters",
    "load_head",
    "probe",
    "refine",
    "save_head",
    "train",
]
