"""Evaluation: streaming confusion matrix and metrics, Hungarian cluster matching,
sliding-window inference, frozen-feature probes (linear probe, k-means) and dense-CRF refinement."""

from labelwise.eval.crf import CRFParams, CRFTimeoutError, crf_labels, crf_refine_batch, dense_crf
from labelwise.eval.kmeans import KMeansProbeResult, kmeans, kmeans_probe
from labelwise.eval.matching import hungarian_match, matched_confusion, remap
from labelwise.eval.metrics import ConfusionMatrix, SegmentationMetrics, confusion_matrix, metrics_from_confusion
from labelwise.eval.probes import LinearProbeResult, linear_probe
from labelwise.eval.sliding_window import predict_logits, sliding_window_logits

__all__ = [
    "CRFParams",
    "CRFTimeoutError",
    "crf_labels",
    "crf_refine_batch",
    "dense_crf",
    "ConfusionMatrix",
    "KMeansProbeResult",
    "LinearProbeResult",
    "SegmentationMetrics",
    "confusion_matrix",
    "hungarian_match",
    "kmeans",
    "kmeans_probe",
    "linear_probe",
    "matched_confusion",
    "metrics_from_confusion",
    "predict_logits",
    "remap",
    "sliding_window_logits",
]
