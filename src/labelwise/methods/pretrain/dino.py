"""DINO self-distillation, optionally with iBOT's masked-patch term.

Student: backbone + :class:`~labelwise.losses.dino.DINOHead` over the pooled features of every
crop (2 global + N local). Teacher: EMA copies of both, fed the two global crops only. With
``dino.ibot`` the student's global crops have random blocks of patches replaced by the mask
token; its patch outputs at the masked positions go through a patch head (its own, or the [CLS]
head with ``shared_head``) and are distilled from the teacher's patch outputs of the unmasked
crops at the same positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from labelwise.engine.ema import frozen_copy
from labelwise.losses.dino import DINOHead, DINOLoss, PatchDistillationLoss, block_masks
from labelwise.methods.pretrain.backbone import Backbone
from labelwise.methods.pretrain.config import DINOConfig
from labelwise.methods.pretrain.objective import Objective


class DINOObjective(Objective):
    """DINO (+ iBOT) on ``student`` with the EMA ``teacher`` (same architecture and weights).

    ``forward(inputs, step)`` with ``inputs["global"] [2B, 3, G, G]``, ``inputs["local"]
    [NB, 3, L, L]`` (view-major) and, with iBOT, ``inputs["masks"]`` bool ``[2B, h * w]``.
    """

    def __init__(self, student: Backbone, teacher: Backbone, config: DINOConfig) -> None:
        super().__init__()
        self.config = config
        self.student = student
        self.teacher = teacher
        head = dict(hidden_dim=config.hidden_dim, bottleneck_dim=config.bottleneck_dim, nlayers=config.nlayers,
                    norm_last_layer=config.norm_last_layer)
        self.student_head = DINOHead(student.dim, config.out_dim, **head)
        self.teacher_head = frozen_copy(self.student_head)
        self.loss = DINOLoss(config.out_dim, config.student_temp, config.warmup_teacher_temp, config.teacher_temp,
                             config.warmup_teacher_temp_steps, config.center_momentum)
        self.student_patch_head: nn.Module | None = None
        self.teacher_patch_head: nn.Module | None = None
        self.patch_loss: PatchDistillationLoss | None = None
        if config.ibot:
            if not config.shared_head:
                self.student_patch_head = DINOHead(student.dim, config.patch_out_dim, **head)
                self.teacher_patch_head = frozen_copy(self.student_patch_head)
            self.patch_loss = PatchDistillationLoss(
                config.patch_out_dim, config.student_temp, config.warmup_teacher_temp, config.patch_teacher_temp,
                config.warmup_teacher_temp_steps, config.center_momentum)

    def _patch_heads(self) -> tuple[nn.Module, nn.Module]:
        if self.student_patch_head is None or self.teacher_patch_head is None:
            return self.student_head, self.teacher_head
        return self.student_patch_head, self.teacher_patch_head

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs: list[tuple[nn.Module, nn.Module]] = [(self.teacher, self.student), (self.teacher_head, self.student_head)]
        if self.student_patch_head is not None and self.teacher_patch_head is not None:
            pairs.append((self.teacher_patch_head, self.student_patch_head))
        return pairs

    def prepare(self, inputs: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        if not self.config.ibot:
            return {}
        views = inputs["global"]
        stride = self.student.stride
        h, w = -(-views.shape[-2] // stride), -(-views.shape[-1] // stride)
        masks = block_masks(views.shape[0], h, w, self.config.mask_prob, self.config.mask_ratio, generator)
        return {"masks": masks.to(views.device)}

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """DINO keeps the last head layer fixed for the first ``freeze_last_layer_steps`` steps
        (no gradient: AdamW then skips the parameter, weight decay included)."""
        if step < self.config.freeze_last_layer_steps:
            heads = [self.student_head] + ([self.student_patch_head] if self.student_patch_head is not None else [])
            for head in heads:
                for param in head.last_layer_parameters():  # type: ignore[operator]
                    param.grad = None

    def forward(self, inputs: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Any]]:
        global_views, local_views = inputs["global"], inputs["local"]
        batch = global_views.shape[0] // 2
        masks: Tensor | None = inputs.get("masks") if self.config.ibot else None

        student_global = self.student(global_views, masks=masks)
        pooled = [student_global.pooled]
        if local_views.shape[0]:
            pooled.append(self.student(local_views).pooled)
        student_out = self.student_head(torch.cat(pooled))  # [(2 + N) B, K]
        with torch.no_grad():
            teacher_global = self.teacher(global_views)
            teacher_out = self.teacher_head(teacher_global.pooled)  # [2B, K]
        views = student_out.shape[0] // batch
        loss_dino = self.loss(student_out.view(views, batch, -1), teacher_out.view(2, batch, -1), step)
        logs: dict[str, Any] = {"loss_dino": loss_dino.detach(), "teacher_temp": self.loss.temperature(step)}
        if masks is None or self.patch_loss is None:
            return loss_dino, logs

        student_head, teacher_head = self._patch_heads()
        image_index, position = masks.nonzero(as_tuple=True)  # M masked patches; M = 0 is fine
        student_tokens = student_global.dense.flatten(2).transpose(1, 2)[image_index, position]  # [M, D]
        with torch.no_grad():
            teacher_tokens = teacher_global.dense.flatten(2).transpose(1, 2)[image_index, position]
            teacher_patch = teacher_head(teacher_tokens)  # [M, K']
        # called on every rank even when M = 0: the centre update is a collective operation, and
        # the (empty) head output keeps every parameter in the graph with a zero gradient (DDP)
        loss_patch = self.patch_loss(student_head(student_tokens), teacher_patch, image_index, masks.shape[0], step)
        logs["loss_ibot"] = loss_patch.detach()
        logs["masked_fraction"] = masks.float().mean()
        return loss_dino + self.config.ibot_weight * loss_patch, logs
