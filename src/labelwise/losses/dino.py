"""DINO self-distillation and the iBOT masked-patch term.

* :class:`DINOHead`: the projection head of DINO (3-layer GELU MLP -> bottleneck -> L2
  normalisation -> weight-normalised linear layer to ``K`` outputs whose weight norm is fixed
  to 1, so the head cannot collapse by growing its output scale).
* :class:`DINOLoss`: cross-entropy between the teacher's centred, sharpened softmax over the
  global crops and the student's softmax over every crop, skipping the pairs where student and
  teacher see the same crop; the centre is an EMA (momentum 0.9) of the teacher's mean output.
* :class:`PatchDistillationLoss`: iBOT's masked image modelling term: the student sees a global
  crop with blocks of patch tokens replaced by a mask token; its patch outputs at the masked
  positions are distilled from the teacher's outputs at the same positions of the unmasked crop
  (own centre, own temperature schedule).
* :func:`block_masks`: BEiT / iBOT block-wise random patch masks.

Losses are computed in float32 whatever the input dtype (bf16 under autocast). Under
``torch.distributed`` the centres average the teacher outputs of every rank, so all ranks keep
the same centre.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def teacher_temperature(step: int, warmup_temp: float, final_temp: float, warmup_steps: int) -> float:
    """Teacher temperature at ``step``: linear from ``warmup_temp`` (step 0) to ``final_temp``
    (step ``warmup_steps``), constant afterwards (DINO's schedule, per step instead of per epoch)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(final_temp)
    return float(warmup_temp + (final_temp - warmup_temp) * step / warmup_steps)


def _all_reduce_mean(total: Tensor, count: int) -> Tensor:
    """``total`` summed over ranks divided by ``count`` summed over ranks (local when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = total.clone()
        dist.all_reduce(total)
        count = count * dist.get_world_size()  # every rank contributes the same number of rows
    return total / max(count, 1)


class DINOHead(nn.Module):
    """``[N, in_dim]`` -> ``[N, out_dim]``: MLP (``nlayers`` linear layers, GELU between) to
    ``bottleneck_dim``, L2 normalisation, then a weight-normalised linear layer without bias.

    Args:
        in_dim: backbone feature size.
        out_dim: ``K``, the number of prototypes (DINO: 65536; a few thousand learn faster on a
            CPU budget).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: size of the normalised bottleneck.
        nlayers: number of MLP layers (>= 1; 1 = a single linear map to the bottleneck).
        norm_last_layer: fix the norm of every last-layer weight row to 1 (DINO's default);
            otherwise the norms (``weight_g``) are learned too.
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # weight norm written out: weight = g * v / ||v|| (row-wise); g fixed to 1 by default
        self.weight_v = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.out_dim = out_dim

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The weight-normalised layer's parameters (DINO freezes them during the first steps)."""
        return [self.weight_v, self.weight_g]

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)
        return F.linear(x, weight.to(x.dtype))


class _CentredDistillation(nn.Module):
    """Shared state of the DINO and iBOT terms: temperatures and a centre buffer ``[1, K]``
    (saved in checkpoints with the model); ``temperature(step)`` is the teacher's, warmed up
    linearly from ``warmup_teacher_temp`` over ``warmup_teacher_temp_steps`` steps."""

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_steps: int, center_momentum: float) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def temperature(self, step: int) -> float:
        return teacher_temperature(step, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_steps)


class DINOLoss(_CentredDistillation):
    """DINO's self-distillation loss with a centred, sharpened teacher.

    ``forward(student [V, B, K], teacher [T, B, K], step)``: the first ``T`` student views are
    the teacher's ``T`` global crops. With ``p_t = softmax((teacher_t - centre) / tau_t(step))``
    and ``log q_v = log_softmax(student_v / tau_s)`` the loss is the mean over every pair
    ``(t, v)`` with ``v != t`` of ``mean_b sum_k -p_t log q_v``. Afterwards the centre moves
    towards the batch mean of the teacher outputs: ``c = m c + (1 - m) mean(teacher)``.

    The centre is a buffer, so it is saved in checkpoints with the model.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0, center_momentum: float = 0.9) -> None:
        super().__init__(out_dim, student_temp, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_steps,
                         center_momentum)

    def forward(self, student: Tensor, teacher: Tensor, step: int) -> Tensor:
        if student.dim() != 3 or teacher.dim() != 3 or student.shape[1:] != teacher.shape[1:]:
            raise ValueError(f"DINOLoss expects student [V, B, K] and teacher [T, B, K], got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
        views, batch = student.shape[0], student.shape[1]
        globals_ = teacher.shape[0]
        if globals_ > views:
            raise ValueError(f"DINOLoss: {globals_} teacher views but only {views} student views")
        with torch.autocast(student.device.type, enabled=False):  # float32 even under autocast
            teacher = teacher.detach().float()
            log_q = F.log_softmax(student.float() / self.student_temp, dim=-1)  # [V, B, K]
            p = F.softmax((teacher - self.center) / self.temperature(step), dim=-1)  # [T, B, K]
            cross = -torch.einsum("tbk,vbk->tv", p, log_q) / batch  # [T, V]
            keep = torch.ones(globals_, views, dtype=torch.bool, device=cross.device)
            keep[torch.arange(globals_), torch.arange(globals_)] = False
            loss = cross[keep].sum() / keep.sum()
            self.update_center(teacher.reshape(-1, teacher.shape[-1]))
        return loss

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """``centre = m * centre + (1 - m) * mean over rows (and ranks) of teacher [N, K]``."""
        batch_center = _all_reduce_mean(teacher.float().sum(0, keepdim=True), teacher.shape[0])
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


class PatchDistillationLoss(_CentredDistillation):
    """iBOT's masked-patch self-distillation term.

    ``forward(student [M, K], teacher [M, K], image_index [M], num_images, step)``: row ``j``
    is masked patch ``j`` of the batch, from image (global crop) ``image_index[j]``; ``student``
    holds the student's patch-head outputs at those positions (it saw the masked crop),
    ``teacher`` the teacher's at the same positions of the unmasked crop. Per image: the mean
    over its masked patches of ``sum_k -softmax((t - c) / tau_t) log_softmax(s / tau_s)``; the
    loss is the mean over all ``num_images`` images (an image without masked patches counts 0,
    as in iBOT). The centre follows the teacher's mean patch output with momentum; unlike iBOT,
    which averages every patch, it averages the masked positions only, the only ones the teacher
    head is run on (a random subset of positions: the same expectation for a fraction of the
    cost).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.07, warmup_teacher_temp_steps: int = 0, center_momentum: float = 0.9) -> None:
        super().__init__(out_dim, student_temp, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_steps,
                         center_momentum)

    def forward(self, student: Tensor, teacher: Tensor, image_index: Tensor, num_images: int, step: int) -> Tensor:
        if student.shape != teacher.shape or student.dim() != 2 or image_index.shape != student.shape[:1]:
            raise ValueError(f"PatchDistillationLoss expects student and teacher [M, K] and image_index [M], got "
                             f"{tuple(student.shape)}, {tuple(teacher.shape)}, {tuple(image_index.shape)}")
        with torch.autocast(student.device.type, enabled=False):  # float32 even under autocast
            teacher = teacher.detach().float()
            p = F.softmax((teacher - self.center) / self.temperature(step), dim=-1)
            per_patch = -(p * F.log_softmax(student.float() / self.student_temp, dim=-1)).sum(-1)  # [M]
            sums = per_patch.new_zeros(num_images).index_add(0, image_index, per_patch)
            counts = per_patch.new_zeros(num_images).index_add(0, image_index, torch.ones_like(per_patch))
            loss = (sums / counts.clamp(min=1.0)).mean()
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """``centre = m * centre + (1 - m) * mean over rows (and ranks) of teacher [M, K]``.

        Ranks may hold different numbers of masked patches, so sums and counts are reduced."""
        total = teacher.float().sum(0, keepdim=True)
        count = torch.tensor([float(teacher.shape[0])], device=teacher.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total, count = total.clone(), count.clone()
            dist.all_reduce(total)
            dist.all_reduce(count)
        if float(count) == 0:
            return
        self.center.mul_(self.center_momentum).add_(total / count * (1 - self.center_momentum))


def block_masks(num_images: int, height: int, width: int, prob: float = 0.5,
                ratio: tuple[float, float] = (0.1, 0.5), generator: torch.Generator | None = None,
                min_block: int | None = None, max_aspect: float = 3.0) -> Tensor:
    """Block-wise random masks (BEiT / iBOT) over an ``height x width`` patch grid.

    Each image is masked with probability ``prob``; a masked image gets rectangles of random
    area (at least ``min_block`` patches, default ``max(1, h * w // 16)``) and aspect ratio (up
    to ``max_aspect``) until a fraction drawn uniformly in ``ratio`` of its patches is covered
    (or no rectangle adds anything in 10 attempts). Returns bool ``[num_images, h * w]``.
    """
    total = height * width
    min_block = max(1, total // 16) if min_block is None else min_block
    log_aspect = math.log(max_aspect)
    masks = torch.zeros(num_images, height, width, dtype=torch.bool)

    def rand() -> float:
        return float(torch.rand(1, generator=generator))

    for index in range(num_images):
        if rand() >= prob:
            continue
        target = int(round((ratio[0] + (ratio[1] - ratio[0]) * rand()) * total))
        mask = masks[index]
        count = 0
        while count < target:
            budget = target - count
            added = 0
            for _ in range(10):
                area = min_block + (max(budget, min_block) - min_block) * rand()
                aspect = math.exp(-log_aspect + 2 * log_aspect * rand())
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if 0 < h <= height and 0 < w <= width:
                    top = int(rand() * (height - h + 1))
                    left = int(rand() * (width - w + 1))
                    new = h * w - int(mask[top:top + h, left:left + w].sum())
                    if 0 < new <= budget:
                        mask[top:top + h, left:left + w] = True
                        added = new
                        break
            if added == 0:
                break
            count += added
    return masks.view(num_images, total)
