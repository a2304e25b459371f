"""Hungarian matching of predicted clusters to classes (unsupervised evaluation).

Input convention: a confusion matrix ``[C, K]`` with rows = target classes and columns =
predicted cluster ids, as produced by ``ConfusionMatrix(C, num_pred=K)`` over the whole split.
The one-to-one assignment maximising the number of matched pixels is found with
``scipy.optimize.linear_sum_assignment``. Every cluster receives a class:

- K == C: a permutation.
- K > C (over-clustering): C clusters are matched one-to-one; each remaining cluster maps to
  the class it overlaps most (its column's argmax; class 0 for a cluster that never occurs on
  a labeled pixel), so every pixel is assigned a class.
- K < C: K classes receive one cluster each; the other classes are never predicted.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["hungarian_match", "remap", "matched_confusion"]

ArrayLike = Tensor | np.ndarray


def _as_numpy(matrix: ArrayLike) -> np.ndarray:
    array = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
    if array.ndim != 2:
        raise ValueError(f"confusion matrix must be 2-D [C, K]; got shape {array.shape}")
    return array


def hungarian_match(confusion: ArrayLike) -> np.ndarray:
    """Cluster-to-class mapping maximising matched pixels.

    Args:
        confusion: ``[C, K]`` counts, rows = target classes, columns = predicted clusters.

    Returns:
        int64 ``[K]``: ``mapping[k]`` is the class id of cluster ``k`` (see module docstring
        for K != C).
    """
    counts = _as_numpy(confusion).astype(np.float64)
    classes, clusters = linear_sum_assignment(counts, maximize=True)
    mapping = counts.argmax(axis=0).astype(np.int64)  # most-overlapping class, for unmatched clusters
    mapping[clusters] = classes
    return mapping


def remap(pred: ArrayLike, mapping: ArrayLike) -> ArrayLike:
    """Replace every cluster id of ``pred`` (any shape, integer) by ``mapping[id]``.

    Returns the same type as ``pred`` (a tensor stays on its device).
    Raises ValueError for an id outside ``[0, len(mapping))``.
    """
    num_clusters = len(mapping)
    if isinstance(pred, Tensor):
        table = torch.as_tensor(np.asarray(mapping), dtype=torch.int64, device=pred.device)
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_clusters):
            raise ValueError(f"cluster ids must be in [0, {num_clusters}); got [{int(pred.min())}, {int(pred.max())}]")
        return table[pred.long()]
    array = np.asarray(pred)
    if array.size and (array.min() < 0 or array.max() >= num_clusters):
        raise ValueError(f"cluster ids must be in [0, {num_clusters}); got [{array.min()}, {array.max()}]")
    return np.asarray(mapping, dtype=np.int64)[array]


def matched_confusion(confusion: ArrayLike, mapping: ArrayLike) -> ArrayLike:
    """Fold a ``[C, K]`` cluster confusion into the ``[C, C]`` class confusion under
    ``mapping`` (``[K]``): column ``j`` of the result sums the columns of every cluster mapped
    to class ``j``. Same type as ``confusion`` (a tensor keeps its device and dtype)."""
    counts = _as_numpy(confusion)
    table = np.asarray(mapping, dtype=np.int64)
    num_classes = counts.shape[0]
    if table.shape != (counts.shape[1],):
        raise ValueError(f"mapping must have shape [{counts.shape[1]}]; got {table.shape}")
    if table.size and (table.min() < 0 or table.max() >= num_classes):
        raise ValueError(f"mapping values must be class ids in [0, {num_classes})")
    folded = np.zeros((num_classes, num_classes), dtype=counts.dtype)
    np.add.at(folded.T, table, counts.T)
    if isinstance(confusion, Tensor):
        return torch.as_tensor(folded, device=confusion.device)
    return folded
