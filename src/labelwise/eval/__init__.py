"""Evaluation: streaming confusion matrix and metrics, Hungarian cluster matching, and
sliding-window inference."""

from labelwise.eval.matching import hungarian_match, matched_confusion, remap
from labelwise.eval.metrics import ConfusionMatrix, SegmentationMetrics, confusion_matrix, metrics_from_confusion
from labelwise.eval.sliding_window import predict_logits, sliding_window_logits

__all__ = [
    "ConfusionMatrix",
    "SegmentationMetrics",
    "confusion_matrix",
    "hungarian_match",
    "matched_confusion",
    "metrics_from_confusion",
    "predict_logits",
    "remap",
    "sliding_window_logits",
]
