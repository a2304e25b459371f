"""Momentum (EMA) teachers: frozen copies of a module and the exponential moving-average update
used by the self-supervised objectives and by the unsupervised heads' teachers."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ema_update", "frozen_copy"]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter frozen (the EMA teacher's heads)."""
    twin = copy.deepcopy(module)
    for param in twin.parameters():
        param.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter (same
    architecture; parameters paired by name). Buffers are left alone (a BatchNorm teacher
    keeps its own running statistics)."""
    t_named = list(teacher.named_parameters())
    s_named = list(student.named_parameters())
    if [n for n, _ in t_named] != [n for n, _ in s_named]:
        raise ValueError("ema_update: teacher and student have different parameters")
    t_params = [p for _, p in t_named]
    s_params = [p.detach() for _, p in s_named]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, torch._foreach_mul(s_params, 1.0 - momentum))
