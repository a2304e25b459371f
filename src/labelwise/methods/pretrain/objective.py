"""What every pretraining objective provides (the EMA update and the cosine schedule live in
``labelwise.engine``).

An :class:`Objective` is the single ``nn.Module`` the trainer trains: it holds the student
backbone and heads (trained), the momentum teacher copies (``requires_grad=False``, updated by
:func:`ema_update` after each optimiser step) and any loss state (centres, queues) as buffers,
so one ``state_dict`` -- one checkpoint -- holds all of it and ``--resume`` is exact.

The step function calls :meth:`Objective.prepare` (method-specific randomness such as iBOT
masks or rotations, drawn from the step's generator outside the autograd graph) and then the
module itself, through DDP when distributed, so that gradients are synchronised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from labelwise.engine.ema import ema_update
from labelwise.methods.pretrain.backbone import Backbone


class Objective(nn.Module):
    """Base class of the pretraining objectives (DINO/iBOT, MoCo/DenseCL, rotation).

    Subclasses set ``student`` and ``teacher`` (``None`` when they have none) and implement
    ``forward``.
    """

    student: Backbone
    teacher: Backbone | None

    def prepare(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Extra inputs for ``forward`` drawn from ``generator`` (no gradients); ``inputs`` holds
        ``global`` ``[2B, 3, G, G]``, ``local`` ``[NB, 3, L, L]`` (view-major), ``boxes``
        ``[B, 2, 4]`` and ``flips`` ``[B, 2]``. Returned keys replace or extend ``inputs``."""
        return {}

    def forward(self, inputs: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Any]]:
        """``(loss, logs)`` for one batch at global step ``step``."""
        raise NotImplementedError

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(teacher module, student module)`` pairs the momentum update covers."""
        return []

    def momentum_update(self, momentum: float) -> None:
        for teacher, student in self.ema_pairs():
            ema_update(teacher, student, momentum)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Hook between backward and the optimiser step (e.g. freezing a layer)."""

    def export_network(self, which: str = "teacher") -> Backbone:
        """The backbone to export: the teacher when asked for and present, else the student."""
        return self.teacher if which == "teacher" and self.teacher is not None else self.student
