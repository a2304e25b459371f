"""Rotation prediction as a pretraining objective: each global crop is rotated by a random
multiple of 90 degrees and a classifier on the pooled features predicts which (no teacher)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from labelwise.losses.rotation import RotationHead, random_rotations, rotation_loss
from labelwise.methods.pretrain.backbone import Backbone
from labelwise.methods.pretrain.config import RotationConfig
from labelwise.methods.pretrain.objective import Objective


class RotationObjective(Objective):
    """``forward(inputs, step)``: ``inputs["global"]`` ``[2B, 3, S, S]`` already rotated by
    :meth:`prepare`, ``inputs["rotation_ids"]`` ``[2B]``."""

    def __init__(self, student: Backbone, config: RotationConfig) -> None:
        super().__init__()
        self.student = student
        self.teacher = None
        self.head = RotationHead(student.dim, config.hidden_dim)

    def prepare(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        rotated, ids = random_rotations(inputs["global"], generator)
        return {"global": rotated, "rotation_ids": ids}

    def forward(self, inputs: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Any]]:
        features = self.student(inputs["global"]).pooled
        loss, accuracy = rotation_loss(self.head, features, inputs["rotation_ids"])
        return loss, {"rotation_accuracy": accuracy}
