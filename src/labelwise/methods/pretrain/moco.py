"""MoCo v2 (global InfoNCE with a momentum encoder) and its dense variant (DenseCL-style).

Both global crops go through the student (queries) and the EMA teacher (keys); the loss is
symmetric: view 1's queries against view 2's keys and vice versa, negatives from a queue of
past keys (or in-batch, ``moco.queue_size: 0``); see :mod:`labelwise.losses.contrastive` for
the choices. ``dense_moco`` adds the dense term on the feature maps (ViT patch tokens, U-Net
deepest map), positives matched through the known crop geometry, and mixes
``(1 - dense_weight) * global + dense_weight * dense``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from labelwise.engine.ema import frozen_copy
from labelwise.losses.contrastive import (
    DenseProjection,
    FeatureQueue,
    ProjectionMLP,
    dense_info_nce,
    info_nce,
    mean_key,
    view_correspondence,
)
from labelwise.methods.pretrain.backbone import Backbone, Features, UNetBackbone
from labelwise.methods.pretrain.config import MoCoConfig
from labelwise.methods.pretrain.objective import Objective


class MoCoObjective(Objective):
    """MoCo v2 / DenseCL on ``student`` with the EMA ``teacher``.

    ``forward(inputs, step)`` uses ``inputs["global"] [2B, 3, G, G]`` (view-major), and for the
    dense term ``inputs["boxes"] [B, 2, 4]`` and ``inputs["flips"] [B, 2]``; with
    ``shuffle_bn`` and a BatchNorm backbone, ``inputs["key_order"]`` (a permutation of ``2B``).
    """

    def __init__(self, student: Backbone, teacher: Backbone, config: MoCoConfig, dense: bool = False) -> None:
        super().__init__()
        self.config = config
        self.dense = dense
        self.student = student
        self.teacher = teacher
        self.student_proj = ProjectionMLP(student.dim, config.hidden_dim, config.dim)
        self.teacher_proj = frozen_copy(self.student_proj)
        self.queue = FeatureQueue(config.queue_size, config.dim) if config.queue_size else None
        self.student_dense: nn.Module | None = None
        self.teacher_dense: nn.Module | None = None
        self.dense_queue: FeatureQueue | None = None
        if dense:
            self.student_dense = DenseProjection(student.dim, config.hidden_dim, config.dim)
            self.teacher_dense = frozen_copy(self.student_dense)
            self.dense_queue = FeatureQueue(config.queue_size, config.dim) if config.queue_size else None
        self.shuffle_bn = config.shuffle_bn and isinstance(student, UNetBackbone)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs: list[tuple[nn.Module, nn.Module]] = [(self.teacher, self.student), (self.teacher_proj, self.student_proj)]
        if self.student_dense is not None and self.teacher_dense is not None:
            pairs.append((self.teacher_dense, self.student_dense))
        return pairs

    def prepare(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        if not self.shuffle_bn:
            return {}
        count = inputs["global"].shape[0]
        return {"key_order": torch.randperm(count, generator=generator).to(inputs["global"].device)}

    @torch.no_grad()
    def _keys(self, views: Tensor, order: Tensor | None) -> Features:
        """Teacher features of ``views``; with ``order``, computed on two shuffled halves (each
        with its own BatchNorm statistics) and put back in the original order."""
        if order is None:
            return self.teacher(views)
        half = views.shape[0] // 2
        shuffled = views[order]
        parts = [self.teacher(shuffled[:half]), self.teacher(shuffled[half:])]
        inverse = torch.argsort(order)
        return Features(torch.cat([p.pooled for p in parts])[inverse], torch.cat([p.dense for p in parts])[inverse])

    def forward(self, inputs: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Any]]:
        views = inputs["global"]
        batch = views.shape[0] // 2
        cfg = self.config
        student = self.student(views)
        teacher = self._keys(views, inputs.get("key_order"))
        queries = self.student_proj(student.pooled)
        with torch.no_grad():
            keys = self.teacher_proj(teacher.pooled)
        negatives = self.queue.queue.clone() if self.queue is not None else None
        q1, q2 = queries[:batch], queries[batch:]
        k1, k2 = keys[:batch], keys[batch:]
        loss_global = 0.5 * (info_nce(q1, k2, negatives, cfg.temperature) + info_nce(q2, k1, negatives, cfg.temperature))
        if self.queue is not None:
            self.queue.push(keys)
        logs: dict[str, Any] = {"loss_global": loss_global.detach()}
        if not self.dense or self.student_dense is None or self.teacher_dense is None:
            return loss_global, logs

        dense_q = self.student_dense(student.dense)  # [2B, P, h, w]
        with torch.no_grad():
            dense_k = self.teacher_dense(teacher.dense)
        h, w = dense_q.shape[-2:]
        boxes, flips = inputs["boxes"], inputs["flips"]
        grid12, valid12 = view_correspondence(boxes[:, 0], flips[:, 0], boxes[:, 1], flips[:, 1], h, w)
        grid21, valid21 = view_correspondence(boxes[:, 1], flips[:, 1], boxes[:, 0], flips[:, 0], h, w)
        dense_negatives = self.dense_queue.queue.clone() if self.dense_queue is not None else None
        loss_dense = 0.5 * (
            dense_info_nce(dense_q[:batch], dense_k[batch:], grid12, valid12, dense_negatives, cfg.temperature)
            + dense_info_nce(dense_q[batch:], dense_k[:batch], grid21, valid21, dense_negatives, cfg.temperature)
        )
        if self.dense_queue is not None:
            self.dense_queue.push(mean_key(dense_k))
        logs["loss_dense"] = loss_dense.detach()
        logs["matched_fraction"] = 0.5 * (valid12.float().mean() + valid21.float().mean())
        return (1 - cfg.dense_weight) * loss_global + cfg.dense_weight * loss_dense, logs
