"""``method: primaps``: K class prototypes fitted by EM to per-image principal mask proposals
over the cached training views (:mod:`labelwise.features.primaps` holds the proposals and the EM
step; this module runs them over a feature cache). No labels are read.

1. ``center``: the mean feature of every training patch (features are clustered centred: the
   component all patches share says nothing about classes).
2. ``threshold`` (when not given): the ``threshold_quantile`` of the cosines between distinct
   patches of the same view, centred features, on ``calibration_images`` seeded views.
3. Prototypes start as k-means (K) on a seeded sample of centred unit patch features.
4. ``em_epochs`` passes over the views in batches: proposals per view, each patch's nearest
   prototype (E-step), each proposal's majority prototype as its patches' pseudo-label, and the
   prototypes moved towards the mean unit feature of their pseudo-labelled patches with
   ``momentum`` after every batch (M-step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from labelwise.eval.kmeans import kmeans
from labelwise.features.cache import FeatureCache
from labelwise.features.primaps import (
    em_prototype_sums,
    mask_majority_labels,
    nearest_prototype,
    principal_mask_proposals,
    prototypes_from_sums,
)
from labelwise.methods.unsupervised.config import PrimapsSettings

__all__ = ["PrimapsFit", "calibrated_threshold", "feature_mean", "fit_primaps"]


@dataclass
class PrimapsFit:
    """Unit prototypes ``[K, D]``, the feature centre ``[D]`` (None when not centred) and a
    summary (threshold and how it was set, claimed patch fraction, seconds)."""

    prototypes: Tensor
    center: Tensor | None
    summary: dict[str, Any]


def _rows(cache: FeatureCache, start: int, stop: int, device: torch.device) -> Tensor:
    return torch.from_numpy(np.asarray(cache.features[start:stop], np.float32)).to(device)


def feature_mean(cache: FeatureCache, device: torch.device, batch: int = 256) -> Tensor:
    """``[D]`` mean of every patch feature of the cache (float64 accumulation)."""
    total = torch.zeros(cache.dim, dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(cache), batch):
        rows = _rows(cache, start, start + batch, device)
        total += rows.double().sum((0, 2, 3))
        count += rows.shape[0] * rows.shape[2] * rows.shape[3]
    return (total / count).float()


def calibrated_threshold(cache: FeatureCache, center: Tensor | None, quantile: float, images: int, seed: int,
                         device: torch.device) -> float:
    """The ``quantile`` of the cosines between distinct patches of the same view (centred unit
    features) over ``images`` seeded views: the label-free proposal threshold."""
    generator = torch.Generator().manual_seed(seed)
    chosen = np.sort(torch.randperm(len(cache), generator=generator)[:images].numpy())
    features = torch.from_numpy(np.asarray(cache.features[chosen], np.float32)).to(device)
    unit = _centred_unit(features, center).flatten(2)  # [n, D, P]
    cosines = torch.bmm(unit.transpose(1, 2), unit)  # [n, P, P]
    off_diagonal = ~torch.eye(cosines.shape[1], dtype=torch.bool, device=device)
    return float(torch.quantile(cosines[:, off_diagonal].flatten().double().cpu()[::7], quantile))


def _centred_unit(features: Tensor, center: Tensor | None) -> Tensor:
    if center is not None:
        features = features - center.view(1, -1, 1, 1)
    return F.normalize(features, dim=1)


def _initial_prototypes(cache: FeatureCache, center: Tensor | None, clusters: int, seed: int, device: torch.device,
                        max_points: int = 100_000) -> Tensor:
    rng = np.random.default_rng(seed)
    n, _, h, w = cache.features.shape
    per_view = max(1, min(h * w, max_points // max(1, n)))
    points = []
    for start in range(0, n, 256):
        unit = _centred_unit(_rows(cache, start, start + 256, device), center).flatten(2)
        chosen = torch.from_numpy(rng.choice(h * w, size=per_view, replace=False)).to(device)
        points.append(unit[:, :, chosen].permute(0, 2, 1).reshape(-1, unit.shape[1]))
    return F.normalize(kmeans(torch.cat(points), clusters, restarts=3, max_iter=100, seed=seed).centroids, dim=1)


def fit_primaps(cache: FeatureCache, settings: PrimapsSettings, clusters: int, device: torch.device, seed: int
                ) -> PrimapsFit:
    """The prototypes of ``method: primaps`` on the cached training views (module docstring)."""
    start_time = time.perf_counter()
    center = feature_mean(cache, device) if settings.center else None
    threshold = settings.threshold
    rule = "given"
    if threshold is None:
        threshold = calibrated_threshold(cache, center, settings.threshold_quantile,
                                         min(settings.calibration_images, len(cache)), seed + 13, device)
        rule = f"quantile {settings.threshold_quantile} of within-view patch cosines"
    prototypes = _initial_prototypes(cache, center, clusters, seed, device)
    claimed = patches = 0
    generator = torch.Generator().manual_seed(seed + 17)
    for _ in range(settings.em_epochs):
        order = torch.randperm(len(cache), generator=generator).numpy()
        for first in range(0, len(order), settings.batch_size):
            batch = np.sort(order[first:first + settings.batch_size])
            unit = _centred_unit(torch.from_numpy(np.asarray(cache.features[batch], np.float32)).to(device), center)
            proposals = principal_mask_proposals(unit, threshold, coverage=settings.coverage,
                                                 max_masks=settings.max_masks)
            points = unit.permute(0, 2, 3, 1).reshape(-1, unit.shape[1])  # [b*h*w, D]
            nearest = nearest_prototype(points, prototypes).view(proposals.shape)
            labels = mask_majority_labels(proposals, nearest, clusters)
            sums, counts = em_prototype_sums(points, labels.flatten(), clusters)
            prototypes = prototypes_from_sums(sums, counts, prototypes, settings.momentum)
            claimed += int((proposals >= 0).sum())
            patches += proposals.numel()
    summary = {"threshold": round(float(threshold), 6), "threshold_rule": rule, "centred": center is not None,
               "claimed_fraction": round(claimed / max(1, patches), 4), "em_epochs": settings.em_epochs,
               "seconds": round(time.perf_counter() - start_time, 2)}
    return PrimapsFit(prototypes.cpu(), None if center is None else center.cpu(), summary)
