"""What a semi-supervised run trains: the segmenter plus what some methods add.

:class:`SemiModel` holds the ``student`` (any labelwise segmentation model, the one exported),
an optional ``teacher`` (an exponential moving average of the student, frozen: it gives the
pseudo-labels when ``semi.ema_teacher`` is on) and an optional ``rotation_head`` (the S4L
auxiliary task on the student's deepest encoder features). Keeping them in one module puts them
all in the trainer's checkpoints, so resumed runs are exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from labelwise.losses.rotation import RotationHead
from labelwise.models.base import DeepSupervisionOutput, ModelOutput, SegmentationModel
from labelwise.models.wide_context import ContextOutput, WideContextSegmenter

__all__ = ["SemiModel", "StudentOutputs", "main_logits"]


def main_logits(output: ModelOutput | ContextOutput) -> Tensor:
    """The logits ``[B, K, H, W]`` of a model output (the fused ones of deep supervision, the
    window's of a wide-context model)."""
    return output.logits if isinstance(output, (DeepSupervisionOutput, ContextOutput)) else output


def _split(output: ModelOutput, n: int) -> tuple[ModelOutput, ModelOutput]:
    if isinstance(output, DeepSupervisionOutput):
        return (DeepSupervisionOutput(output.logits[:n], [s[:n] for s in output.side_logits]),
                DeepSupervisionOutput(output.logits[n:], [s[n:] for s in output.side_logits]))
    return output[:n], output[n:]


@dataclass
class StudentOutputs:
    """What one consistency step's student forward returns (:meth:`SemiModel.forward`): the
    output on the labeled images (a :class:`ContextOutput` for a wide-context student, whose
    context logits take the auxiliary context loss) and the main logits ``[B, K, H, W]`` of the
    other passes asked for; ``rotation``: rotation logits ``[N, 4]``."""

    labeled: ModelOutput | ContextOutput
    weak: Tensor
    strong: Tensor | None = None
    feature_perturbed: Tensor | None = None
    transformed: Tensor | None = None
    rotation: Tensor | None = None


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

    def forward(self, images: Tensor, weak: Tensor | None = None, strong: Tensor | None = None,
                feature_dropout: Callable[[list[Tensor]], list[Tensor]] | None = None,
                transformed: Tensor | None = None, rotated: Tensor | None = None) -> ModelOutput | StudentOutputs:
        """``forward(images)``: the student's output. With ``weak`` (a consistency step): every
        computation of the student in the step, so that under DistributedDataParallel one forward
        carries all the gradients:

        - ``images [n, ...]`` (labeled) and ``weak [n, ...]`` (weak views), in one pass when
          their sizes match;
        - ``strong`` (strong views, any number of ``n``-image groups concatenated);
        - ``feature_dropout``: the weak views' encoder features through it and the decoder (the
          feature-perturbation stream);
        - ``transformed`` (a transformed copy of the weak views) and ``rotated`` (rotated square
          crops, whose pooled deepest features go through the rotation head).

        The order of the passes is fixed (it decides which random numbers dropout layers draw).
        """
        if weak is None:
            return self.student(images)
        student = self.student
        n = images.shape[0]
        joint = images.shape[-2:] == weak.shape[-2:]
        inputs = torch.cat([images, weak]) if joint else images
        context_map = None
        if isinstance(student, WideContextSegmenter):
            features, context_map = student.encode_with_context(inputs)
        else:
            features = student.encode(inputs)
        output = student.decode(features, size=inputs.shape[-2:])
        if joint:
            labeled, weak_output = _split(output, n)
            weak_features = [f[n:] for f in features]
        else:
            labeled = output
            weak_features = student.encode(weak)
            weak_output = student.decode(weak_features, size=weak.shape[-2:])
        if context_map is not None and student.training:  # the labeled windows' context logits
            labeled = ContextOutput(labeled, student.context_head(context_map[:n], images.shape[-2:]))
        outputs = StudentOutputs(labeled, main_logits(weak_output))
        if strong is not None:
            outputs.strong = main_logits(student(strong))
        if feature_dropout is not None:
            outputs.feature_perturbed = main_logits(student.decode(feature_dropout(weak_features),
                                                                   size=weak.shape[-2:]))
        if transformed is not None:
            outputs.transformed = main_logits(student(transformed))
        if rotated is not None and self.rotation_head is not None:
            pooled = student.encode(rotated)[-1].float().mean((2, 3))
            outputs.rotation = self.rotation_head(pooled).float()
        return outputs

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
