"""A DeepCluster / PiCIE-style clustering loss for unsupervised segmentation heads.

Once per epoch the training loop calls :meth:`ClusteringLoss.recluster` with a sample of head
codes; k-means (``labelwise.eval.kmeans.kmeans``, Euclidean on L2-normalised codes) gives ``k``
prototypes, L2-normalised and then fixed for the epoch. During the epoch, for a code map
``c [B, C, h, w]``:

* logits ``s[b, j, y, x] = c_hat[b, :, y, x] . p_hat_j / temperature`` (cosine similarity to
  every prototype; ``x_hat`` = L2-normalised along channels); the prototypes get no gradient;
* pseudo-labels ``y[b, y, x] = argmax_j s[b, j, y, x]`` (the nearest prototype by cosine),
  recomputed from the current codes without gradient;
* ``CE(s, y)`` = the cross-entropy of the logits against the labels, averaged over pixels
  (with per-cluster weights ``w``: ``sum_i w[y_i] ce_i / sum_i w[y_i]``, as
  ``F.cross_entropy(weight=w)``).

One view: ``loss = CE(s1, y1)``. Two views of the same pixels (e.g. a photometrically jittered
copy with the same geometry, so pixel ``(b, y, x)`` is the same image location in both):
``loss = (CE(s1, y1) + CE(s2, y2) + CE(s1, y2) + CE(s2, y1)) / 4``, i.e. PiCIE's
``(within + across) / 2`` with ``within = (CE(s1, y1) + CE(s2, y2)) / 2`` and
``across = (CE(s1, y2) + CE(s2, y1)) / 2``: the mean of four pixel-mean cross-entropies.

Differences from PiCIE: one set of prototypes for both views (PiCIE clusters each view
separately), and pseudo-labels taken from the current codes at each step instead of once per
epoch (the codes are cheap here: the backbone features are cached, and the geometric crops of
a step are not known in advance). ``balance=True`` weights clusters by inverse frequency among
the points of the last re-clustering (PiCIE's default balancing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import ConfigError
from labelwise.eval.kmeans import kmeans

__all__ = [
    "ClusteringConfig",
    "ClusteringLoss",
    "cluster_logits",
    "cluster_pseudo_labels",
    "clustering_loss",
    "fit_prototypes",
]


@dataclass
class ClusteringConfig:
    """num_clusters: ``k``; temperature: divides the cosine logits; kmeans_iters: Lloyd
    iterations per re-clustering; kmeans_restarts: k-means++ restarts; fit_points: at most this
    many codes (a seeded random subset) are clustered; seed: k-means / subset seed (re-clustering
    ``r`` uses ``seed + r``); balance: inverse-frequency cluster weights in the cross-entropy."""

    num_clusters: int = 27
    temperature: float = 1.0
    kmeans_iters: int = 30
    kmeans_restarts: int = 1
    fit_points: int = 100_000
    seed: int = 0
    balance: bool = False

    def validate(self) -> None:
        for name in ("num_clusters", "kmeans_iters", "kmeans_restarts", "fit_points", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: must be an integer, got {value!r}")
        if self.num_clusters < 2:
            raise ConfigError(f"num_clusters: must be >= 2, got {self.num_clusters}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0 or self.temperature == float("inf"):
            raise ConfigError(f"temperature: must be a finite number > 0, got {self.temperature!r}")
        if self.kmeans_iters < 1:
            raise ConfigError(f"kmeans_iters: must be >= 1, got {self.kmeans_iters}")
        if self.kmeans_restarts < 1:
            raise ConfigError(f"kmeans_restarts: must be >= 1, got {self.kmeans_restarts}")
        if self.fit_points < self.num_clusters:
            raise ConfigError(f"fit_points: must be >= num_clusters ({self.num_clusters}), got {self.fit_points}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if not isinstance(self.balance, bool):
            raise ConfigError(f"balance: must be true or false, got {self.balance!r}")


def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _flatten_codes(codes: Tensor) -> Tensor:
    """``[M, C]`` from ``[M, C]`` or ``[B, C, h, w]``."""
    if codes.dim() == 4:
        return codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
    if codes.dim() == 2:
        return codes
    raise ValueError(f"expected codes [M, C] or [B, C, h, w], got {tuple(codes.shape)}")


@torch.no_grad()
def fit_prototypes(codes: Tensor, k: int, *, seed: int = 0, iters: int = 30, restarts: int = 1,
                   max_points: int | None = None) -> Tensor:
    """``[k, C]`` L2-normalised k-means centroids of the L2-normalised ``codes [M, C]``.

    ``max_points``: cluster a random subset of that many rows (drawn with ``seed``) when there
    are more. k-means: :func:`labelwise.eval.kmeans.kmeans` with ``restarts``, ``max_iter=iters``
    and ``seed``. Float32 (float64 input stays float64), on ``codes``' device.
    """
    if codes.dim() != 2:
        raise ValueError(f"fit_prototypes expects codes [M, C], got {tuple(codes.shape)}")
    x = F.normalize(_float(codes.detach()), dim=1)
    if max_points is not None and x.shape[0] > max_points:
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(x.shape[0], generator=generator)[:max_points]
        x = x[chosen.to(x.device)]
    result = kmeans(x, k, restarts=restarts, max_iter=iters, seed=seed)
    return F.normalize(result.centroids, dim=1)


def cluster_logits(code: Tensor, prototypes: Tensor, temperature: float = 1.0) -> Tensor:
    """``[B, k, h, w]`` cosine similarities of ``code [B, C, h, w]`` to ``prototypes [k, C]``,
    divided by ``temperature``; the prototypes are detached (no gradient reaches them)."""
    if code.dim() != 4 or prototypes.dim() != 2 or code.shape[1] != prototypes.shape[1]:
        raise ValueError(f"expected code [B, C, h, w] and prototypes [k, C]; "
                         f"got {tuple(code.shape)} and {tuple(prototypes.shape)}")
    with torch.autocast(code.device.type, enabled=False):
        c = F.normalize(_float(code), dim=1)
        p = F.normalize(prototypes.detach().to(device=c.device, dtype=c.dtype), dim=1)
        return torch.einsum("bchw,kc->bkhw", c, p) / temperature


@torch.no_grad()
def cluster_pseudo_labels(code: Tensor, prototypes: Tensor) -> Tensor:
    """``[B, h, w]`` int64: index of the prototype with the highest cosine similarity to each
    code vector of ``code [B, C, h, w]`` (first index on ties)."""
    return cluster_logits(code, prototypes).argmax(dim=1)


def clustering_loss(code: Tensor, code_other: Tensor | None, prototypes: Tensor, temperature: float = 1.0, *,
                    weight: Tensor | None = None) -> Tensor:
    """The clustering loss of one batch (see the module docstring for the exact average).

    Args:
        code: ``[B, C, h, w]`` head output (view 1).
        code_other: ``[B, C, h, w]`` head output of a second view of the same pixels, or
            ``None`` for the single-view loss ``CE(s1, y1)``.
        prototypes: ``[k, C]`` cluster prototypes (normalised here; no gradient).
        temperature: divides the cosine logits.
        weight: optional ``[k]`` per-cluster weights of the cross-entropy.

    Returns:
        A scalar (float32, float64 for float64 codes) with gradient to the codes only.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature}")
    if code_other is not None and code_other.shape != code.shape:
        raise ValueError(f"code_other must have the shape of code {tuple(code.shape)}, got {tuple(code_other.shape)}")
    logits = cluster_logits(code, prototypes, temperature)
    if weight is not None:
        weight = weight.detach().to(device=logits.device, dtype=logits.dtype)
    with torch.no_grad():
        labels = logits.argmax(dim=1)
    if code_other is None:
        return F.cross_entropy(logits, labels, weight=weight)
    logits_other = cluster_logits(code_other, prototypes, temperature)
    with torch.no_grad():
        labels_other = logits_other.argmax(dim=1)
    within = F.cross_entropy(logits, labels, weight=weight) + F.cross_entropy(logits_other, labels_other, weight=weight)
    across = F.cross_entropy(logits, labels_other, weight=weight) + F.cross_entropy(logits_other, labels, weight=weight)
    return (within + across) / 4


class ClusteringLoss(nn.Module):
    """:func:`clustering_loss` with its prototypes as state.

    Buffers (saved in checkpoints): ``prototypes [k, dim]`` (zeros until the first
    :meth:`recluster`), ``cluster_weight [k]`` (ones unless ``balance``), ``fitted`` and
    ``reclusters`` (how many re-clusterings ran; seeds the next one).
    """

    prototypes: Tensor
    cluster_weight: Tensor
    fitted: Tensor
    reclusters: Tensor

    def __init__(self, dim: int, config: ClusteringConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClusteringConfig()
        self.config.validate()
        if dim < 1:
            raise ConfigError(f"dim: must be >= 1, got {dim}")
        k = self.config.num_clusters
        self.register_buffer("prototypes", torch.zeros(k, dim))
        self.register_buffer("cluster_weight", torch.ones(k))
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("reclusters", torch.tensor(0, dtype=torch.long))

    @torch.no_grad()
    def recluster(self, codes: Tensor) -> Tensor:
        """Fit new prototypes to ``codes`` (``[M, C]`` or ``[B, C, h, w]``, e.g. the head's
        codes of a random subset of the training patches; at most ``fit_points`` of them are
        used) and return them. Call once per epoch, before the epoch's steps."""
        cfg = self.config
        flat = _flatten_codes(codes.detach())
        if flat.shape[1] != self.prototypes.shape[1]:
            raise ValueError(f"codes have {flat.shape[1]} channels, the loss was built for {self.prototypes.shape[1]}")
        seed = cfg.seed + int(self.reclusters)
        protos = fit_prototypes(flat, cfg.num_clusters, seed=seed, iters=cfg.kmeans_iters,
                                restarts=cfg.kmeans_restarts, max_points=cfg.fit_points)
        self.prototypes.copy_(protos.to(self.prototypes))
        if cfg.balance:
            x = F.normalize(_float(flat), dim=1)
            labels = (x @ protos.to(device=x.device, dtype=x.dtype).T).argmax(1)
            counts = torch.bincount(labels, minlength=cfg.num_clusters).clamp(min=1).to(self.cluster_weight)
            inverse = counts.sum() / counts
            self.cluster_weight.copy_(inverse / inverse.mean())
        self.fitted.fill_(True)
        self.reclusters += 1
        return self.prototypes

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError("ClusteringLoss: call recluster(codes) before the first step")

    def pseudo_labels(self, code: Tensor) -> Tensor:
        """:func:`cluster_pseudo_labels` with the current prototypes."""
        self._check_fitted()
        return cluster_pseudo_labels(code, self.prototypes)

    def forward(self, code: Tensor, code_other: Tensor | None = None) -> Tensor:
        self._check_fitted()
        weight = self.cluster_weight if self.config.balance else None
        return clustering_loss(code, code_other, self.prototypes, self.config.temperature, weight=weight)

    def extra_repr(self) -> str:
        return f"num_clusters={self.config.num_clusters}, dim={self.prototypes.shape[1]}"
