"""k-means in torch (k-means++ seeding, restarts, batched distances) and the k-means probe.

The probe is the unsupervised baseline of the evaluation protocol: cluster the L2-normalised
frozen patch features of a whole split into K clusters, score every pixel at full label
resolution, match clusters to classes once over the split (Hungarian, ``eval/matching.py``) and
report the usual metrics.

Algorithm (:func:`kmeans`): Euclidean Lloyd iterations on the given points (the probe passes
unit-norm features, so the distance is monotone in cosine similarity; centroids are plain means,
not renormalised). Seeding (:func:`kmeans_plusplus`): the first centre is the point at index
``floor(u_0 N)`` and centre ``i`` the point where the cumulative sum of squared distances to the
nearest chosen centre first exceeds ``u_i`` times its total, with ``u = torch.rand(k,
generator=g, dtype=float64)`` drawn up front (inverse-CDF sampling, so a reference
implementation given ``u`` picks the same points). Each restart draws new ``u``; the restart
with the lowest inertia (sum of squared distances) wins. An empty cluster is re-seeded with the
point farthest from its centroid. Iterations stop when no assignment changes, the inertia
improves by less than ``tol`` (relative), or after ``max_iter``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from labelwise.errors import ConfigError
from labelwise.eval.matching import hungarian_match, matched_confusion
from labelwise.eval.metrics import ConfusionMatrix, SegmentationMetrics, metrics_from_confusion
from labelwise.features.cache import FeatureCache

__all__ = [
    "KMeansProbeResult",
    "KMeansResult",
    "assign_clusters",
    "kmeans",
    "kmeans_plusplus",
    "kmeans_probe",
    "pairwise_sq_distances",
]


def pairwise_sq_distances(x: Tensor, centroids: Tensor, batch_size: int = 65536) -> Tensor:
    """Squared Euclidean distances ``[N, K]`` between ``x [N, D]`` and ``centroids [K, D]``.

    Computed as ``|x|^2 - 2 x.c + |c|^2`` (clamped at 0) in row batches of ``batch_size``, in the
    dtype of ``x`` (use float32 or float64).
    """
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"expected x [N, D] and centroids [K, D]; got {tuple(x.shape)} and {tuple(centroids.shape)}")
    centroids = centroids.to(x.dtype)
    c_norm = (centroids * centroids).sum(1)
    out = torch.empty(x.shape[0], centroids.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        dots = chunk @ centroids.T
        out[start:start + batch_size] = ((chunk * chunk).sum(1, keepdim=True) - 2 * dots + c_norm).clamp_(min=0)
    return out


def assign_clusters(x: Tensor, centroids: Tensor, batch_size: int = 65536) -> tuple[Tensor, Tensor]:
    """``(labels [N] int64, squared distance to the nearest centroid [N])``, in row batches."""
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        d = pairwise_sq_distances(x[start:start + batch_size], centroids, batch_size)
        dist[start:start + batch_size], labels[start:start + batch_size] = d.min(1)
    return labels, dist


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator | None = None, batch_size: int = 65536) -> Tensor:
    """Indices ``[k]`` of the k-means++ seeds of ``x [N, D]`` (see the module docstring)."""
    num = x.shape[0]
    if not 1 <= k <= num:
        raise ConfigError(f"k-means: need 1 <= k <= number of points ({num}), got k = {k}")
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64)
    indices = torch.empty(k, dtype=torch.int64)
    indices[0] = min(int(uniforms[0] * num), num - 1)
    closest = pairwise_sq_distances(x, x[indices[:1]], batch_size)[:, 0].double().cpu()
    for i in range(1, k):
        cumulative = torch.cumsum(closest, 0)
        total = float(cumulative[-1])
        if total <= 0:  # every point coincides with a chosen centre
            choice = min(int(uniforms[i] * num), num - 1)
        else:
            choice = int(torch.searchsorted(cumulative, uniforms[i] * total, right=True).clamp(max=num - 1))
        indices[i] = choice
        new = pairwise_sq_distances(x, x[choice:choice + 1], batch_size)[:, 0].double().cpu()
        closest = torch.minimum(closest, new)
    return indices


@dataclass
class KMeansResult:
    """centroids ``[K, D]``, labels ``[N]``, inertia (sum of squared distances), the Lloyd
    iterations of the winning restart, and the inertia of every restart."""

    centroids: Tensor
    labels: Tensor
    inertia: float
    iterations: int
    restart_inertias: list[float]


def _lloyd(x: Tensor, centroids: Tensor, max_iter: int, tol: float, batch_size: int) -> tuple[Tensor, Tensor, float, int]:
    k = centroids.shape[0]
    labels, dist = assign_clusters(x, centroids, batch_size)
    inertia = float(dist.sum())
    iterations = 0
    for iterations in range(1, max_iter + 1):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = sums / counts.clamp(min=1)[:, None]
        if bool(empty.any()):
            order = torch.argsort(dist, descending=True)
            for slot, point in zip(torch.nonzero(empty)[:, 0].tolist(), order.tolist()):
                centroids[slot] = x[point]
        new_labels, dist = assign_clusters(x, centroids, batch_size)
        new_inertia = float(dist.sum())
        changed = bool((new_labels != labels).any())
        labels = new_labels
        improvement = inertia - new_inertia
        inertia = new_inertia
        if not changed or improvement <= tol * max(abs(inertia), 1e-12):
            break
    return centroids, labels, inertia, iterations


def kmeans(x: Tensor, k: int, *, restarts: int = 3, max_iter: int = 100, tol: float = 1e-5, seed: int = 0,
           batch_size: int = 65536) -> KMeansResult:
    """Cluster ``x [N, D]`` (float32 / float64, any device) into ``k`` clusters.

    ``restarts`` k-means++ seedings (seeded by ``seed``), each refined by Lloyd iterations; the
    lowest-inertia run is returned.
    """
    if restarts < 1:
        raise ConfigError(f"k-means: restarts must be >= 1, got {restarts}")
    if not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"k-means expects float points [N, D]; got {x.dtype} {tuple(x.shape)}")
    generator = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    inertias = []
    for _ in range(restarts):
        seeds = kmeans_plusplus(x, k, generator, batch_size).to(x.device)
        centroids, labels, inertia, iterations = _lloyd(x, x[seeds].clone(), max_iter, tol, batch_size)
        inertias.append(inertia)
        if best is None or inertia < best.inertia:
            best = KMeansResult(centroids, labels, inertia, iterations, [])
    assert best is not None
    best.restart_inertias = inertias
    return best


# ---------------------------------------------------------------------------------------------
# The probe


@dataclass
class KMeansProbeResult:
    """Outcome of :func:`kmeans_probe`.

    metrics: after Hungarian matching; mapping ``[K]``: class of each cluster; confusion ``[C, K]``
    (rows = classes, columns = clusters); centroids ``[K, D]`` in the normalised feature space.
    """

    metrics: SegmentationMetrics
    mapping: np.ndarray
    confusion: np.ndarray
    centroids: Tensor
    inertia: float
    fit_points: int
    seconds: float

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        return {**self.metrics.to_dict(class_names), "mapping": self.mapping.tolist(), "inertia": self.inertia,
                "fit_points": self.fit_points, "seconds": self.seconds}


def upsample_scores(scores: Tensor, image_size: Sequence[int], stride: int | None) -> Tensor:
    """Bilinearly upsample per-patch scores ``[B, C, h, w]`` to the label resolution ``[B, C, H, W]``.

    With a known ``stride`` the grid covers the padded image ``(h * stride, w * stride)``
    (bottom/right padding), so scores are resized to that and cropped to ``(H, W)``; otherwise
    they are resized to ``(H, W)`` directly. ``align_corners=False``.
    """
    height, width = int(image_size[0]), int(image_size[1])
    h, w = scores.shape[-2:]
    size = (h * stride, w * stride) if stride else (height, width)
    if tuple(scores.shape[-2:]) != size:
        scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    return scores[..., :height, :width]


def _normalised_rows(cache: FeatureCache, start: int, stop: int, device: torch.device) -> Tensor:
    """L2-normalised features of samples ``[start, stop)`` as ``[B, D, h, w]`` float32."""
    features = torch.from_numpy(np.asarray(cache.features[start:stop], dtype=np.float32)).to(device)
    return F.normalize(features, dim=1)


@torch.no_grad()
def kmeans_probe(cache: FeatureCache, num_clusters: int | None = None, *, num_classes: int | None = None,
                 restarts: int = 5, max_iter: int = 100, seed: int = 0, fit_points: int | None = 200_000,
                 device: str | torch.device = "cpu", batch_size: int = 8) -> KMeansProbeResult:
    """k-means on the L2-normalised features of a whole split, Hungarian-matched, scored at full
    label resolution.

    Args:
        cache: features and labels of the split (``extract_features(..., labels=True)``).
        num_clusters: K (default: the number of classes).
        fit_points: cluster a random (seeded) subset of this many patches when the split has
            more; every patch is then assigned (None = all patches).
        batch_size: images per scoring batch.

    Every pixel gets the cluster with the highest bilinearly upsampled score
    ``x.c - |c|^2 / 2`` (the nearest centroid at patch centres); the ``[C, K]`` confusion over
    the split is matched once by ``hungarian_match``.
    """
    start_time = time.perf_counter()
    if cache.labels is None:
        raise ConfigError(f"{cache.path}: the k-means probe needs labels in the feature cache")
    num_classes = num_classes or cache.num_classes or int(np.max(np.where(
        np.asarray(cache.labels) == cache.ignore_index, 0, np.asarray(cache.labels)))) + 1
    k = num_clusters or num_classes
    torch_device = torch.device(device)
    n, d, h, w = cache.features.shape
    total = n * h * w
    rng = np.random.default_rng(seed)
    if fit_points is not None and total > fit_points:
        chosen = np.sort(rng.choice(total, size=fit_points, replace=False))
    else:
        chosen = None
    points = []
    for start in range(0, n, batch_size):
        rows = _normalised_rows(cache, start, min(start + batch_size, n), torch_device)
        flat = rows.permute(0, 2, 3, 1).reshape(-1, d)
        if chosen is not None:
            lo, hi = start * h * w, min(start + batch_size, n) * h * w
            sel = chosen[(chosen >= lo) & (chosen < hi)] - lo
            flat = flat[torch.from_numpy(sel).to(torch_device)]
        points.append(flat)
    x = torch.cat(points)
    result = kmeans(x, k, restarts=restarts, max_iter=max_iter, seed=seed)
    centroids = result.centroids
    half_norm = (centroids * centroids).sum(1) / 2

    confusion = ConfusionMatrix(num_classes, ignore_index=cache.ignore_index, num_pred=k, device=torch_device)
    for start in range(0, n, batch_size):
        rows = _normalised_rows(cache, start, min(start + batch_size, n), torch_device)
        scores = torch.einsum("bdhw,kd->bkhw", rows, centroids) - half_norm[None, :, None, None]
        clusters = upsample_scores(scores, cache.image_size, cache.stride).argmax(1)
        labels = torch.from_numpy(np.asarray(cache.labels[start:start + batch_size], dtype=np.int64)).to(torch_device)
        confusion.update(clusters, labels)
    counts = confusion.matrix.cpu().numpy()
    mapping = hungarian_match(counts)
    metrics = metrics_from_confusion(matched_confusion(counts, mapping))
    return KMeansProbeResult(metrics, mapping, counts, centroids.cpu(), result.inertia, int(x.shape[0]),
                             time.perf_counter() - start_time)
