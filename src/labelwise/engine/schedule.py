"""Learning-rate schedules over one or several training stages.

The lr is a pure function of the global step, so resuming needs nothing but the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from labelwise.config import StageConfig


@dataclass(frozen=True)
class StagePosition:
    """Where global step ``step`` falls: stage index, step inside that stage, stage length."""

    index: int
    step_in_stage: int
    stage_steps: int


def locate_stage(stages: Sequence[StageConfig], step: int) -> StagePosition:
    """Stage of global step ``step`` (0-based); steps past the end belong to the last stage."""
    start = 0
    for index, stage in enumerate(stages):
        if step < start + stage.steps:
            return StagePosition(index, step - start, stage.steps)
        start += stage.steps
    last = len(stages) - 1
    return StagePosition(last, stages[last].steps, stages[last].steps)


def stage_lr(stage: StageConfig, step_in_stage: int) -> float:
    """lr at ``step_in_stage`` of ``stage``: linear warm-up from 0 over ``warmup_steps``, then
    ``poly`` ((1 - t)^power), ``cosine`` or ``constant`` decay from ``lr`` to ``min_lr``."""
    if stage.warmup_steps and step_in_stage < stage.warmup_steps:
        return stage.lr * (step_in_stage + 1) / stage.warmup_steps
    span = max(1, stage.steps - stage.warmup_steps)
    t = min(1.0, (step_in_stage - stage.warmup_steps) / span)
    if stage.schedule == "constant":
        factor = 1.0
    elif stage.schedule == "poly":
        factor = (1.0 - t) ** stage.poly_power
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * t))
    return stage.min_lr + (stage.lr - stage.min_lr) * factor


def lr_at(stages: Sequence[StageConfig], step: int) -> float:
    """Global-step lr of a multi-stage schedule."""
    position = locate_stage(stages, step)
    return stage_lr(stages[position.index], position.step_in_stage)


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * step / total_steps)) / 2``: ``start`` at step 0,
    ``end`` at ``total_steps`` (DINO's schedule for weight decay and teacher momentum)."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))
