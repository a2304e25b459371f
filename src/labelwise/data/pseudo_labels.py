"""Pseudo-labels from a model's own scores, for self-training: which pixels to keep, and the
folder-dataset layout they are written in.

Two regimes self-train a segmenter on a teacher's predictions: ``unsupervised refine`` (cluster
ids of a label-free run) and ``weak run``'s ``self_training`` rounds (class ids of the segmenter
trained on CAM pseudo-masks, restricted to each image's tags). Both keep, per image and per
predicted id, only the most confident share of that id's pixels (:func:`select_confident`, with
the top-1 minus top-2 margin of :func:`margin_confidence`), so every id keeps pixels even where
its scores are low overall, and both write ``root/train/{images,labels}/<stem>.png`` (ids, 255
where left out) + ``root/classes.json``: an ordinary labelwise folder dataset the supervised
pipeline trains on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from labelwise.data.windows import TileWindows
from labelwise.report.png import write_id_png, write_rgb_png

__all__ = ["IGNORE_INDEX", "content_mask", "file_stems", "keep_counts", "margin_confidence", "restrict_scores",
           "select_confident", "write_pseudo_label"]

#: Label value of the pixels a pseudo-label leaves out (the folder dataset's ignore index).
IGNORE_INDEX = 255


def margin_confidence(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``(ids [B, H, W] int64, margin [B, H, W] float32)`` of scores or probabilities
    ``[B, K, H, W]``: the top-1 output and its lead over the second (0 when ``K == 1``)."""
    if scores.shape[1] < 2:
        return scores.argmax(1), torch.zeros(scores.shape[0], *scores.shape[2:], device=scores.device)
    top = scores.float().topk(2, dim=1)
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1]


def restrict_scores(scores: Tensor, allowed: Tensor) -> Tensor:
    """Scores ``[B, K, H, W]`` (float32) with the outputs an image may not predict
    (``allowed [B, K]`` False, e.g. classes its tags rule out) set to ``-inf``, so the argmax and
    the top-1 minus top-2 margin of :func:`margin_confidence` are taken among the allowed outputs
    (an image with a single allowed output gets margin ``+inf``: it is sure). An image with no
    allowed output keeps its scores."""
    allowed = allowed.to(device=scores.device, dtype=torch.bool)
    allowed = allowed | ~allowed.any(1, keepdim=True)
    return scores.float().masked_fill(~allowed[:, :, None, None], float("-inf"))


def keep_counts(counts: Tensor, keep_fraction: float) -> Tensor:
    """How many of ``counts`` pixels an id keeps: ``floor(keep_fraction * n + 0.5)`` (float64),
    at least one of an id that is present. Same shape and device as ``counts``."""
    kept = torch.floor(counts.double() * keep_fraction + 0.5).long()
    return torch.where(counts > 0, kept.clamp(min=1), kept)


def select_confident(ids: Tensor, confidence: Tensor, keep_fraction: float, num_clusters: int,
                     valid: Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pseudo-labels ``[B, H, W]`` int64: per image and per id ``k``, the :func:`keep_counts`
    most confident of the ``n_k`` pixels predicted ``k`` keep ``k`` (ties: the earlier pixel in
    raster order); the others, and pixels outside ``valid``, become ``ignore_index``.

    Args:
        ids: int ids ``[B, H, W]`` in ``[0, num_clusters)`` (clusters or classes).
        confidence: float ``[B, H, W]`` (higher = surer), e.g. :func:`margin_confidence`'s margin.
        keep_fraction: share in (0, 1] of each id's pixels kept.
        num_clusters: K.
        valid: optional bool ``[B, H, W]``; False pixels (padding) are never labeled nor counted.

    Vectorised: one stable sort by confidence, then one stable sort by (image, id) puts each
    group's pixels in decreasing confidence; a pixel is kept when its rank in its group is below
    the group's count.
    """
    b = ids.shape[0]
    groups = ids.reshape(b, -1).long()
    if valid is not None:
        groups = groups.masked_fill(~valid.reshape(b, -1), num_clusters)  # the group of excluded pixels
    groups = (groups + torch.arange(b, device=ids.device)[:, None] * (num_clusters + 1)).reshape(-1)
    order = torch.argsort(confidence.reshape(-1).float(), descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_groups = groups[order]
    counts = torch.bincount(groups, minlength=b * (num_clusters + 1))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(groups.numel(), device=ids.device) - starts[sorted_groups]
    kept_sorted = rank < keep_counts(counts, keep_fraction)[sorted_groups]
    kept = torch.empty_like(kept_sorted)
    kept[order] = kept_sorted
    kept &= groups % (num_clusters + 1) != num_clusters
    return torch.where(kept.reshape(ids.shape), ids.long(), torch.full_like(ids.long(), ignore_index))


def content_mask(source: Dataset, index: int, shape: tuple[int, int]) -> Tensor | None:
    """Bool ``[H, W]``: the pixels of sample ``index`` that show the image (False: the padding of
    a :class:`~labelwise.data.windows.TileWindows` window past the tile's end); None: all."""
    if not isinstance(source, TileWindows):
        return None
    _, _, _, _, rows, _, cols = source.windows[index]
    if rows >= shape[0] and cols >= shape[1]:
        return None
    valid = torch.zeros(shape, dtype=torch.bool)
    valid[:rows, :cols] = True
    return valid


def file_stems(names: list[str]) -> list[str]:
    """File-name stems for the sample names: ``/`` and ``\\`` become ``__``; a repeated name gets
    its index appended."""
    stems, seen = [], set()
    for index, name in enumerate(names):
        stem = name.replace("/", "__").replace("\\", "__") or f"{index:06d}"
        if stem in seen:
            stem = f"{stem}_{index:06d}"
        seen.add(stem)
        stems.append(stem)
    return stems


def write_pseudo_label(image: Tensor, labels: Tensor, root: str | Path, stem: str,
                       max_id: int = IGNORE_INDEX) -> None:
    """Write one training pair of a pseudo-label folder dataset (atomically):
    ``root/train/images/<stem>.png`` from ``image`` float ``[3, H, W]`` in [0, 1] and
    ``root/train/labels/<stem>.png`` from ``labels`` int ``[H, W]`` (ids, ``IGNORE_INDEX`` where
    left out; ``max_id`` the largest value the folder may hold, which fixes the PNG depth)."""
    root = Path(root)
    rgb = (image.detach().float().permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
    write_rgb_png(rgb, root / "train" / "images" / f"{stem}.png")
    write_id_png(np.asarray(labels.detach().cpu().numpy()), root / "train" / "labels" / f"{stem}.png", max_id)
