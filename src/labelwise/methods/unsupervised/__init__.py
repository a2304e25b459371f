"""Unsupervised segmentation on frozen self-supervised ViT features (``labelwise unsupervised``).

Methods (``UnsupervisedConfig.method``): ``hp`` (Hidden Positives, CVPR 2023: task-agnostic and
task-specific global hidden positives, local hidden positives, photometric consistency; the
``hp.task_specific`` / ``hp.local`` switches give the paper's ablation rows), ``stego``
(STEGO's correspondence loss), ``picie`` (a DeepCluster / PiCIE-style clustering loss) and
``kmeans`` (no training: k-means on the raw backbone features).

    from labelwise.config import load_config
    from labelwise.methods import unsupervised

    config = load_config(unsupervised.UnsupervisedConfig, None, ["data.dataset=synthetic"])
    result = unsupervised.train(config)                  # run_dir: head + centroids (no labels used)
    scores = unsupervised.probe(result.run_dir)          # cluster probe (Hungarian), linear probe, CRF
    labelwise.load(result.run_dir).predict(images)       # cluster ids (labelwise.inference; `labelwise predict`)

Modules: ``config``, ``data`` (five-crop / whole-image views, photometric copies), ``model``
(the head and its export as a ``clusters`` model folder), ``train``, ``probe``. Prediction,
cluster-to-class matching with a few labeled images and CRF refinement are those of every model
folder: :mod:`labelwise.inference` (``labelwise predict RUN images/ --match-with labeled/``).
"""

from labelwise.methods.unsupervised.config import (
    METHODS,
    ClusteringSettings,
    FeatureConfig,
    HPSettings,
    StegoSettings,
    UnsupervisedConfig,
    UnsupervisedEvalConfig,
)
from labelwise.methods.unsupervised.evaluate import evaluate_clusters, probe
from labelwise.methods.unsupervised.model import ExportedHead, UnsupervisedHead, load_head, save_head
from labelwise.methods.unsupervised.train import SELECTION_RULE, UnsupervisedResult, train

__all__ = [
    "METHODS",
    "SELECTION_RULE",
    "ClusteringSettings",
    "ExportedHead",
    "FeatureConfig",
    "HPSettings",
    "StegoSettings",
    "UnsupervisedConfig",
    "UnsupervisedEvalConfig",
    "UnsupervisedHead",
    "UnsupervisedResult",
    "evaluate_clusters",
    "load_head",
    "probe",
    "save_head",
    "train",
]
