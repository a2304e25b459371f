"""The trained part of an unsupervised run, and its export.

:class:`UnsupervisedHead` holds the code head (the only network trained), and per method: HP's
momentum head, projection and reference pools (buffers, so checkpoints resume exactly); PiCIE's
prototypes. ``k-means`` has no head: codes are the backbone features themselves.

An exported model is a folder with ``unsupervised.json`` (method, backbone, dims, views, the
label-free selection rule, cluster count) and ``head.safetensors`` (the head's weights and the
``centroids [K, C]`` of the cluster probe, fitted without labels on the training codes).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from labelwise.engine.atomic import atomic_path, atomic_write_json
from labelwise.errors import CheckpointError
from labelwise.models.heads import ContrastProjection, ProjectionHead

__all__ = ["MODEL_FILE", "SUMMARY_FILE", "ExportedHead", "UnsupervisedHead", "load_head", "save_head"]

MODEL_FILE = "head.safetensors"
SUMMARY_FILE = "unsupervised.json"


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
        self.dim = in_dim if method == "kmeans" else dim
        if method == "kmeans":
            return
        self.head = ProjectionHead(in_dim, dim, dropout)
        if not training_parts:  # an export: the code head is all prediction needs
            return
        if method == "hp":
            self.momentum_head = copy.deepcopy(self.head)
            for param in self.momentum_head.parameters():
                param.requires_grad_(False)
            self.projection = ContrastProjection(dim)
            self.register_buffer("pool_ag", torch.zeros(pool_size, in_dim))
            self.register_buffer("pool_sp", torch.zeros(pool_size, dim))
        if method == "picie":
            self.register_buffer("prototypes", torch.zeros(prototypes, dim))

    def forward(self, features: Tensor) -> Tensor:
        if self.method == "kmeans":
            return features
        return self.head(features)


@dataclass
class ExportedHead:
    """A loaded export: the head in eval mode, the cluster centroids ``[K, dim]`` (unit rows) and
    the summary dict of ``unsupervised.json``."""

    head: UnsupervisedHead
    centroids: Tensor
    summary: dict[str, Any]

    @torch.no_grad()
    def codes(self, features: Tensor) -> Tensor:
        """Unit-norm codes ``[B, dim, h, w]`` of backbone features ``[B, D, h, w]``."""
        return F.normalize(self.head(features.float()), dim=1)


def save_head(folder: str | Path, head: UnsupervisedHead, centroids: Tensor, summary: dict[str, Any]) -> Path:
    """Write ``head.safetensors`` (code head only: what prediction needs) and ``unsupervised.json``
    atomically; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {} if head.method == "kmeans" else {f"head.{k}": v.detach().contiguous().cpu()
                                                   for k, v in head.head.state_dict().items()}
    tensors["centroids"] = centroids.detach().float().contiguous().cpu()
    with atomic_path(folder / MODEL_FILE) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(folder / SUMMARY_FILE, {**summary, "method": head.method, "in_dim": head.in_dim,
                                              "dim": head.dim, "clusters": int(centroids.shape[0])})
    return folder


def load_head(folder: str | Path) -> ExportedHead:
    """Read an export written by :func:`save_head`; ``CheckpointError`` naming the file otherwise."""
    folder = Path(folder)
    summary_path, weights_path = folder / SUMMARY_FILE, folder / MODEL_FILE
    try:
        summary = json.loads(summary_path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{summary_path}: missing (not an unsupervised labelwise model folder)") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{summary_path}: corrupt JSON: {exc}") from exc
    try:
        tensors = load_file(str(weights_path))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{weights_path}: missing") from exc
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{weights_path}: unreadable ({exc})") from exc
    if "centroids" not in tensors:
        raise CheckpointError(f"{weights_path}: no 'centroids' tensor")
    head = UnsupervisedHead(summary["method"], int(summary["in_dim"]), int(summary["dim"]), training_parts=False)
    if head.method != "kmeans":
        state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        missing, unexpected = head.head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{weights_path}: missing keys {missing}, unexpected keys {unexpected}")
    head.eval()
    return ExportedHead(head, F.normalize(tensors["centroids"].float(), dim=1), summary)
