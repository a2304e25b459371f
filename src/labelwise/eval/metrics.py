"""Streaming confusion matrix and the segmentation metrics derived from it.

The confusion matrix has rows = target (ground-truth) class and columns = predicted class:
``matrix[t, p]`` counts the pixels of target class ``t`` predicted as ``p``. Pixels whose
target is ``ignore_index`` are never counted.

Metric definitions (per class c, with ``TP = M[c, c]``, ``FN = row_c - TP``,
``FP = col_c - TP``):

- ``pixel_acc = trace(M) / sum(M)``
- ``per_class_acc[c] = TP / row_c`` (recall), NaN when class c is absent from the target;
  ``mean_acc`` = mean over the classes present in the target.
- ``per_class_iou[c] = TP / (TP + FP + FN)``, NaN when the union is 0, i.e. the class is absent
  from both target and prediction. ``miou`` = mean over the classes with union > 0 (a NaN-mean).
  This is the usual convention (MMSegmentation, STEGO/HP evaluation): a class that is neither
  present nor predicted does not count, while a class predicted but absent from the target
  counts with IoU 0.
- ``per_class_f1[c] = 2 TP / (2 TP + FP + FN)`` (= Dice), NaN when the union is 0;
  ``mean_f1`` = mean over the classes with union > 0.
- ``freq_weighted_iou = sum_c (row_c / sum(M)) * iou_c`` over the classes present in the target.

Every mean over an empty set (no counted pixel at all) is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from labelwise.errors import ConfigError

__all__ = ["ConfusionMatrix", "SegmentationMetrics", "confusion_matrix", "metrics_from_confusion"]


# --------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------
def _check_labels(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        hint = " (pass class ids, e.g. logits.argmax(1), not logits)" if pred.dim() == target.dim() + 1 else ""
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}{hint}")
    for name, tensor in (("pred", pred), ("target", target)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer class ids; got dtype {tensor.dtype}")


def _first_bad_value(values: Tensor, low: int, high: int) -> int | None:
    """The first value of ``values`` outside ``[low, high)``, or None (one host sync)."""
    bad = (values < low) | (values >= high)
    if not bool(bad.any()):
        return None
    return int(values[bad][0].item())


def _count(pred: Tensor, target: Tensor, num_classes: int, num_pred: int, ignore_index: int) -> Tensor:
    """int64 ``[num_classes, num_pred]`` counts of (target, pred) pairs, ignore pixels excluded.

    Raises ValueError for a target value that is neither a class nor ``ignore_index``, or a
    prediction outside ``[0, num_pred)`` (checked on every pixel, ignored ones included).
    """
    _check_labels(pred, target)
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    bad_pred = _first_bad_value(pred, 0, num_pred)
    if bad_pred is not None:
        raise ValueError(f"prediction value {bad_pred} is outside [0, {num_pred})")
    valid = target != ignore_index
    target, pred = target[valid], pred[valid]
    bad_target = _first_bad_value(target, 0, num_classes)
    if bad_target is not None:
        raise ValueError(
            f"target value {bad_target} is not a class id in [0, {num_classes}) "
            f"and not the ignore index {ignore_index}"
        )
    counts = torch.bincount(target * num_pred + pred, minlength=num_classes * num_pred)
    return counts.reshape(num_classes, num_pred)


def confusion_matrix(
    pred: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    num_pred: int | None = None,
) -> Tensor:
    """One-shot confusion matrix.

    Args:
        pred: integer class ids, any shape (e.g. ``[B, H, W]`` or ``[N]``).
        target: integer class ids of the same shape, ``ignore_index`` for unlabeled pixels.
        num_classes: C, the number of target classes.
        num_pred: K, the number of predicted ids (clusters) when it differs from C.

    Returns:
        int64 ``[C, K]`` (``[C, C]`` by default) on the device of the inputs; rows = target.
    """
    return _count(pred, target, num_classes, num_pred or num_classes, ignore_index)


class ConfusionMatrix:
    """Confusion matrix accumulated over a whole split, on the device of the inputs.

    Args:
        num_classes: C, number of target classes.
        ignore_index: target value of unlabeled pixels (not counted).
        device: where the matrix lives; by default the device of the first ``update``.
        num_pred: K, number of predicted ids when different from C (unsupervised clusters);
            the matrix is then ``[C, K]`` and must be Hungarian-matched before ``compute``.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
        num_pred: int | None = None,
    ) -> None:
        if num_classes < 1:
            raise ConfigError(f"ConfusionMatrix: num_classes must be >= 1; got {num_classes}")
        if num_pred is not None and num_pred < 1:
            raise ConfigError(f"ConfusionMatrix: num_pred must be >= 1; got {num_pred}")
        self.num_classes = int(num_classes)
        self.num_pred = int(num_pred or num_classes)
        self.ignore_index = int(ignore_index)
        self.device = None if device is None else torch.device(device)
        self._matrix: Tensor | None = None

    def _zeros(self, device: torch.device | None) -> Tensor:
        return torch.zeros(self.num_classes, self.num_pred, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Count one batch: ``pred`` and ``target`` integer tensors of one shape
        (``[B, H, W]`` or ``[N]``). Raises ValueError on an invalid value (see module doc)."""
        if self._matrix is None:
            self._matrix = self._zeros(self.device or pred.device)
        device = self._matrix.device
        counts = _count(pred.to(device), target.to(device), self.num_classes, self.num_pred, self.ignore_index)
        self._matrix += counts

    def reset(self) -> None:
        """Forget every count."""
        self._matrix = None

    @property
    def matrix(self) -> Tensor:
        """int64 ``[C, K]`` copy of the counts (rows = target, columns = prediction)."""
        if self._matrix is None:
            return self._zeros(self.device)
        return self._matrix.clone()

    def merge(self, other: ConfusionMatrix | Tensor) -> ConfusionMatrix:
        """Add the counts of another matrix (same C, K) in place; returns self."""
        counts = other.matrix if isinstance(other, ConfusionMatrix) else torch.as_tensor(other)
        if tuple(counts.shape) != (self.num_classes, self.num_pred):
            raise ValueError(
                f"cannot merge a {tuple(counts.shape)} matrix into a {(self.num_classes, self.num_pred)} one"
            )
        if self._matrix is None:
            self._matrix = self._zeros(self.device or counts.device)
        self._matrix += counts.to(device=self._matrix.device, dtype=torch.int64)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all DDP processes (no-op unless torch.distributed is
        initialised). Every process must call it; returns self."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._matrix is None:
            self._matrix = self._zeros(self.device)
        tensor = self._matrix
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        self._matrix = tensor.to(self._matrix.device)
        return self

    def compute(self) -> SegmentationMetrics:
        """Metrics of the counts so far (requires a square matrix: K == C)."""
        return metrics_from_confusion(self.matrix)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Element-wise ``num / den`` with NaN where ``den == 0``."""
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


@dataclass
class SegmentationMetrics:
    """Metrics of one confusion matrix (definitions in the module docstring).

    Scalars are Python floats in [0, 1] (NaN when undefined); per-class values are lists of
    length C with NaN for undefined classes.
    """

    pixel_acc: float
    mean_acc: float
    miou: float
    mean_f1: float
    freq_weighted_iou: float
    per_class_iou: list[float]
    per_class_acc: list[float]
    per_class_f1: list[float]
    num_pixels: int

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able dict; per-class lists become ``{name: value}`` (names default to
        ``"0"``, ``"1"``, ...), NaN becomes None (JSON null)."""
        num_classes = len(self.per_class_iou)
        names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names given for {num_classes} classes")

        def per_class(values: list[float]) -> dict[str, float | None]:
            return {name: _nan_to_none(v) for name, v in zip(names, values)}

        return {
            "pixel_acc": _nan_to_none(self.pixel_acc),
            "mean_acc": _nan_to_none(self.mean_acc),
            "miou": _nan_to_none(self.miou),
            "mean_f1": _nan_to_none(self.mean_f1),
            "freq_weighted_iou": _nan_to_none(self.freq_weighted_iou),
            "per_class_iou": per_class(self.per_class_iou),
            "per_class_acc": per_class(self.per_class_acc),
            "per_class_f1": per_class(self.per_class_f1),
            "num_pixels": int(self.num_pixels),
        }


def metrics_from_confusion(matrix: Tensor | np.ndarray) -> SegmentationMetrics:
    """Metrics of a square confusion matrix ``[C, C]`` (rows = target, columns = prediction)."""
    counts = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(
            f"metrics need a square [C, C] confusion matrix; got {counts.shape} "
            "(match clusters to classes first, see labelwise.eval.matching)"
        )
    counts = counts.astype(np.float64)
    tp = np.diag(counts)
    target_count = counts.sum(axis=1)
    pred_count = counts.sum(axis=0)
    union = target_count + pred_count - tp
    total = counts.sum()

    iou = _safe_div(tp, union)
    acc = _safe_div(tp, target_count)
    f1 = _safe_div(2 * tp, target_count + pred_count)
    present = target_count > 0
    fw_iou = float((target_count[present] / total * iou[present]).sum()) if total > 0 else math.nan
    return SegmentationMetrics(
        pixel_acc=float(tp.sum() / total) if total > 0 else math.nan,
        mean_acc=_nanmean(acc),
        miou=_nanmean(iou),
        mean_f1=_nanmean(f1),
        freq_weighted_iou=fw_iou,
        per_class_iou=iou.tolist(),
        per_class_acc=acc.tolist(),
        per_class_f1=f1.tolist(),
        num_pixels=int(total),
    )
