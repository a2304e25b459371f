"""What a semi-supervised run trains: the segmenter plus what some methods add.

:class:`SemiModel` holds the ``student`` (any labelwise segmentation model, the one exported),
an optional ``teacher`` (an exponential moving average of the student, frozen: it gives the
pseudo-labels when ``semi.ema_teacher`` is on) and an optional ``rotation_head`` (the S4L
auxiliary task on the student's deepest encoder features). Keeping them in one module puts them
all in the trainer's checkpoints, so resumed runs are exact.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from labelwise.losses.rotation import RotationHead
from labelwise.models.base import DeepSupervisionOutput, ModelOutput, SegmentationModel

__all__ = ["SemiModel", "main_logits"]


def main_logits(output: ModelOutput) -> Tensor:
    """The logits ``[B, K, H, W]`` of a model output (the fused ones of deep supervision)."""
    return output.logits if isinstance(output, DeepSupervisionOutput) else output


class SemiModel(nn.Module):
    """Student + optional EMA teacher + optional rotation head (module docstring).

    Args:
        student: the segmenter.
        ema_teacher: keep a frozen EMA copy of the student.
        rotation_features: channels of the student's deepest encoder feature map, to add a
            linear rotation head on them (None: no head).
    """

    def __init__(self, student: SegmentationModel, ema_teacher: bool = False,
                 rotation_features: int | None = None) -> None:
        super().__init__()
        self.student = student
        self.teacher: SegmentationModel | None = None
        if ema_teacher:
            self.teacher = copy.deepcopy(student)
            for param in self.teacher.parameters():
                param.requires_grad_(False)
        self.rotation_head = RotationHead(rotation_features) if rotation_features else None

    def forward(self, images: Tensor) -> ModelOutput:
        return self.student(images)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter;
        buffers (BatchNorm statistics) are copied."""
        if self.teacher is None:
            return
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
            teacher.mul_(momentum).add_(student.detach(), alpha=1 - momentum)
        for teacher_buffer, student_buffer in zip(self.teacher.buffers(), self.student.buffers()):
            teacher_buffer.copy_(student_buffer)
