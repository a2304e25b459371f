"""The trained part of an unsupervised run, and its export.

:class:`UnsupervisedHead` holds the code head (the only network trained), and per method: HP's
momentum head, projection and reference pools (buffers, so checkpoints resume exactly); PiCIE's
prototypes. ``k-means`` has no head: codes are the backbone features themselves.

An exported model is a ``clusters`` artifact (:mod:`labelwise.models.artifact`): ``model.json``
(whose ``unsupervised`` record holds method, backbone, dims, views, the label-free selection
rule and cluster count) + ``weights.safetensors`` (backbone, code head and the ``centroids
[K, C]`` of the cluster probe, fitted without labels on the training codes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from labelwise.config import EvalConfig, to_dict
from labelwise.errors import CheckpointError
from labelwise.models.artifact import cluster_class_map, load_artifact, provenance, save_artifact
from labelwise.models.clusters import ClusterSegmenter
from labelwise.models.feature_backbones import backbone_preprocessing
from labelwise.models.heads import ContrastProjection, ProjectionHead

__all__ = ["FEATURE_SPACE_METHODS", "PREDICT_WINDOW", "ExportedHead", "UnsupervisedHead", "load_head", "save_head"]

#: Methods that cluster the backbone features themselves (no head is trained).
FEATURE_SPACE_METHODS = ("kmeans", "primaps")

#: Sliding-window size (pixels) an exported model predicts large images with.
PREDICT_WINDOW = 1024


class UnsupervisedHead(nn.Module):
    """``forward(features [B, D, h, w]) -> codes [B, dim, h, w]`` (features unchanged for k-means).

    Attributes (when the method uses them): ``head`` (:class:`ProjectionHead`), ``momentum_head``
    (EMA copy, no gradient), ``projection`` (:class:`ContrastProjection`), buffers ``pool_ag``
    ``[Q, D]`` / ``pool_sp`` ``[Q, dim]`` (HP) and ``prototypes`` ``[K, dim]`` (PiCIE);
    ``training_parts=False`` builds the code head alone (what an export holds).
    """

    def __init__(self, method: str, in_dim: int, dim: int, dropout: float = 0.1, pool_size: int = 0,
                 prototypes: int = 0, training_parts: bool = True) -> None:
        super().__init__()
        self.method = method
        self.in_dim = in_dim
        self.dim = in_dim if method in FEATURE_SPACE_METHODS else dim
        if method in FEATURE_SPACE_METHODS:
            return
        self.head = ProjectionHead(in_dim, dim, dropout)
        if not training_parts:  # an export: the code head is all prediction needs
            return
        if method == "hp":
            # [reference code entropy (NaN until measured), lambda cap (2: none)] of the collapse guard
            self.register_buffer("collapse_state", torch.tensor([float("nan"), 2.0], dtype=torch.float64))
            self.momentum_head = copy.deepcopy(self.head)
            for param in self.momentum_head.parameters():
                param.requires_grad_(False)
            self.projection = ContrastProjection(dim)
            self.register_buffer("pool_ag", torch.zeros(pool_size, in_dim))
            self.register_buffer("pool_sp", torch.zeros(pool_size, dim))
        if method == "picie":
            self.register_buffer("prototypes", torch.zeros(prototypes, dim))

    def forward(self, features: Tensor, compute: Callable[[UnsupervisedHead], Any] | None = None) -> Any:
        """Codes ``[B, dim, h, w]`` of ``features``; or, with ``compute``, ``compute(self)``: a training
        step's loss computed inside this forward, so that under DistributedDataParallel every use
        of the parameters is seen by DDP's one forward and their gradients are synchronised."""
        if compute is not None:
            return compute(self)
        if self.method in FEATURE_SPACE_METHODS:
            return features
        return self.head(features)


@dataclass
class ExportedHead:
    """A loaded unsupervised model: its :class:`~labelwise.models.clusters.ClusterSegmenter` (frozen
    backbone, code head, unit centroids ``[K, dim]``) and the run summary (``model.json``'s
    ``unsupervised`` record: method, backbone name, dims, views, selection rule, cluster count)."""

    segmenter: ClusterSegmenter
    summary: dict[str, Any]

    @property
    def backbone(self) -> nn.Module:
        return self.segmenter.backbone

    @property
    def centroids(self) -> Tensor:
        return self.segmenter.centroids

    @torch.no_grad()
    def codes(self, features: Tensor) -> Tensor:
        """Unit-norm codes ``[B, dim, h, w]`` of backbone features ``[B, D, h, w]``."""
        return self.segmenter.codes(features)


def save_head(folder: str | Path, backbone: nn.Module, head: UnsupervisedHead, centroids: Tensor,
              summary: dict[str, Any], data: dict[str, Any] | None = None, feature_center: Tensor | None = None
              ) -> Path:
    """Export the run as a ``clusters`` artifact (``model.json`` + ``weights.safetensors``): the
    backbone, the code head (what prediction needs; k-means has none) and the centroids, so the
    folder predicts on its own. Returns the folder."""
    module = ClusterSegmenter(backbone, centroids.cpu(), head.head if hasattr(head, "head") else None,
                              None if feature_center is None else feature_center.cpu())
    record = {**summary, "method": head.method, "in_dim": head.in_dim, "dim": head.dim,
              "clusters": int(centroids.shape[0])}
    preprocessing = backbone_preprocessing(backbone)
    return save_artifact(folder, "clusters", module, module.config(), cluster_class_map(module.num_clusters),
                         preprocessing=preprocessing, source={"backbone": str(summary.get("backbone"))},
                         # images above 1,024 px go through the ViT in overlapping windows
                         eval_config=to_dict(EvalConfig(window=PREDICT_WINDOW)),
                         training=provenance(data), extra={"unsupervised": record})


def load_head(folder: str | Path) -> ExportedHead:
    """Read an unsupervised model folder (or an older ``unsupervised.json`` export); a
    ``CheckpointError`` naming the file otherwise."""
    artifact = load_artifact(folder)
    if artifact.kind != "clusters":
        raise CheckpointError(f"{artifact.folder}: a {artifact.kind!r} model, not an unsupervised one")
    if not isinstance(artifact.module, ClusterSegmenter):
        raise CheckpointError(f"{artifact.folder}: a refined cluster model (a segmenter trained by `labelwise "
                              "unsupervised refine`), which has no centroids to probe: score it with `labelwise "
                              "evaluate` (clusters are matched to classes there)")
    segmenter: ClusterSegmenter = artifact.module  # type: ignore[assignment]
    return ExportedHead(segmenter, dict(artifact.info.get("unsupervised") or {}))
