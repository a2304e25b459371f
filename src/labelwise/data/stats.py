"""Class statistics of label masks: one-hot encoding, pixel counts, class-balanced weights."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

WEIGHT_METHODS = ("inverse_sqrt", "inverse", "median_frequency", "effective_number")


def one_hot(mask: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """One-hot encode class ids.

    Args:
        mask: long ``[B, H, W]`` (or ``[H, W]``) of ids in ``[0, num_classes)`` or ``ignore_index``.

    Returns:
        float ``[B, C, H, W]`` (``[C, H, W]`` for a 2-D mask); ignore pixels are all-zero.

    Raises:
        ValueError: a value that is neither a class id nor ``ignore_index``.
    """
    if mask.dim() == 2:
        return one_hot(mask.unsqueeze(0), num_classes, ignore_index)[0]
    if mask.dim() != 3:
        raise ValueError(f"one_hot: mask must be [B, H, W] or [H, W], got shape {tuple(mask.shape)}")
    mask = mask.long()
    valid = mask != ignore_index
    bad = valid & ((mask < 0) | (mask >= num_classes))
    if bool(bad.any()):
        values = torch.unique(mask[bad]).tolist()[:8]
        raise ValueError(f"one_hot: mask values {values} are neither in [0, {num_classes}) nor ignore_index {ignore_index}")
    index = torch.where(valid, mask, torch.zeros_like(mask)).unsqueeze(1)
    out = torch.zeros(mask.shape[0], num_classes, *mask.shape[1:], dtype=torch.float32, device=mask.device)
    out.scatter_(1, index, 1.0)
    return out * valid.unsqueeze(1)


def _masks(source: Any) -> Iterable[Any]:
    """Masks of a dataset (reading only masks when it offers ``load_mask``) or an iterable of
    masks / samples."""
    if hasattr(source, "load_mask") and hasattr(source, "__len__"):
        return (source.load_mask(i) for i in range(len(source)))
    if hasattr(source, "__getitem__") and hasattr(source, "__len__") and hasattr(source, "class_map"):
        return (source[i]["mask"] for i in range(len(source)))
    return (item["mask"] if isinstance(item, dict) else item for item in source)


def class_frequencies(source: Any, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Pixel count of every class over a dataset or an iterable of masks.

    Args:
        source: a SegmentationDataset, or an iterable of masks (tensors / arrays of any shape)
            or of Sample dicts.

    Returns:
        float64 ``[num_classes]`` pixel counts (ignore pixels excluded).

    Raises:
        ValueError: a mask value that is neither a class id nor ``ignore_index``.
    """
    counts = np.zeros(num_classes, dtype=np.float64)
    for mask in _masks(source):
        values = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        values = values.reshape(-1).astype(np.int64, copy=False)
        values = values[values != ignore_index]
        if values.size == 0:
            continue
        if values.min() < 0 or values.max() >= num_classes:
            bad = np.unique(values[(values < 0) | (values >= num_classes)])[:8].tolist()
            raise ValueError(f"class_frequencies: mask values {bad} are neither in [0, {num_classes}) nor ignore_index {ignore_index}")
        counts += np.bincount(values, minlength=num_classes)
    return counts


def class_balanced_weights(counts: Any, method: str = "inverse_sqrt", beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights from pixel counts ``[C]``.

    Methods (``n_c`` = count of class ``c``, ``f_c = n_c / sum(n)``):

    * ``"inverse"``: ``1 / n_c``; ``"inverse_sqrt"``: ``1 / sqrt(n_c)``;
    * ``"median_frequency"``: ``median(f) / f_c`` (median over present classes);
    * ``"effective_number"``: ``(1 - beta) / (1 - beta ** n_c)`` (Cui et al. 2019; with pixel
      counts use ``beta`` very close to 1, e.g. 0.99999, or all weights come out equal).

    Weights are scaled so that the count-weighted mean weight is 1 (``sum(n * w) / sum(n) == 1``),
    so the loss keeps its scale. Classes absent from ``counts`` get the largest weight of the
    present classes (not 0: counts taken from a labeled subset must not silence a class that
    appears later, e.g. in pseudo-labels; not infinity).

    Returns:
        float32 ``[C]``.
    """
    n = np.asarray(counts, dtype=np.float64).reshape(-1)
    if method not in WEIGHT_METHODS:
        raise ValueError(f"class_balanced_weights: unknown method {method!r}; choose one of {list(WEIGHT_METHODS)}")
    if n.size == 0 or not np.all(np.isfinite(n)) or np.any(n < 0):
        raise ValueError("class_balanced_weights: counts must be a non-empty vector of finite non-negative numbers")
    present = n > 0
    if not present.any():
        raise ValueError("class_balanced_weights: every count is zero")
    m = n[present]
    if method == "inverse":
        w = 1.0 / m
    elif method == "inverse_sqrt":
        w = 1.0 / np.sqrt(m)
    elif method == "median_frequency":
        freq = m / m.sum()
        w = np.median(freq) / freq
    else:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"class_balanced_weights: beta must lie in (0, 1), got {beta}")
        w = (1.0 - beta) / -np.expm1(m * np.log(beta))
    w = w * (m.sum() / (m * w).sum())
    weights = np.full(n.shape, w.max())
    weights[present] = w
    return torch.from_numpy(weights).float()
