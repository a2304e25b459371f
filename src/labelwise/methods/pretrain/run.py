"""``train(config)``: build the data, the objective and the schedules, run the shared Trainer,
export the backbone and write the summary."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from labelwise.config import ScheduleConfig, save_config, to_dict
from labelwise.data.images import ImageFolderDataset
from labelwise.data.multicrop import MultiCropAugment, MultiCropConfig, MultiCropDataset, multicrop_collate
from labelwise.engine.runtime import resolve_device, seed_everything
from labelwise.engine.schedule import cosine_schedule
from labelwise.engine.trainer import StepContext, StepOutput, Trainer, TrainResult, trainer_options, unwrap
from labelwise.io.run_lock import locks_run_folder
from labelwise.methods.pretrain.backbone import UNetBackbone, ViTBackbone, build_backbone, export_backbone, make_teacher
from labelwise.methods.pretrain.config import PretrainConfig
from labelwise.methods.pretrain.dino import DINOObjective
from labelwise.methods.pretrain.moco import MoCoObjective
from labelwise.methods.pretrain.objective import Objective
from labelwise.methods.pretrain.rotation import RotationObjective
from labelwise.models.artifact import INFO_FILE, WEIGHTS_FILE, provenance, write_artifact_info
from labelwise.models.init import initialise_from

#: the exported backbone (the file ``load_vit`` / ``--init`` read) and, written last, its description
BACKBONE_FILE = WEIGHTS_FILE
SUMMARY_FILE = INFO_FILE
#: the summary's place in ``model.json``
SUMMARY_KEY = "pretrain"


@dataclass
class PretrainResult:
    """Outcome of :func:`train`: the run folder, the trainer's summary, the exported backbone
    (``None`` until the run has finished) and its summary (``model.json``'s ``pretrain`` entry)."""

    run_dir: Path
    train: TrainResult
    backbone_path: Path | None
    summary: dict[str, Any]


def build_objective(config: PretrainConfig, run_dir: Path | None = None) -> Objective:
    """The objective module of ``config.method`` with a student initialised from ``config.init``
    (or randomly) and its EMA teacher, a copy of the student. The init report goes to
    ``run_dir`` when given."""
    mask_token = config.method == "dino" and config.dino.ibot
    student = build_backbone(config.backbone, mask_token=mask_token)
    if config.init is not None:
        target = student.vit if isinstance(student, ViTBackbone) else student
        initialise_from(target, config.init, run_dir=run_dir, verbose=False)
    if config.method == "rotation":
        return RotationObjective(student, config.rotation)
    teacher = make_teacher(student, config.backbone, mask_token=mask_token)
    if config.method == "dino":
        return DINOObjective(student, teacher, config.dino)
    return MoCoObjective(student, teacher, config.moco, dense=config.method == "dense_moco")


def crop_settings(config: PretrainConfig) -> MultiCropConfig:
    """The multi-crop settings of the run: local crops are only used by DINO."""
    return config.multicrop if config.method == "dino" else replace(config.multicrop, local_crops=0)


def total_steps(config: PretrainConfig, num_images: int, world_size: int = 1) -> int:
    """The stage's ``steps``, or ``epochs`` worth of full batches over ``num_images`` images."""
    if config.epochs is None:
        return config.stages[0].steps
    per_epoch = num_images // (config.data.batch_size * world_size)
    return max(1, math.ceil(float(config.epochs or 0) * per_epoch))


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of the photometric augmentation and method randomness of one step:
    a pure function of (seed, step, rank), so a resumed run draws the same numbers."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def make_step_fn(augment: MultiCropAugment, seed: int, channels_last: bool = False,
                 schedule_logs: Callable[[int], dict[str, float]] | None = None):  # noqa: ANN201
    """Step function: photometric augmentation of the collated crops (float32, no autocast),
    the objective's own randomness, then the objective through the (possibly DDP) module.
    ``schedule_logs(step)`` adds scheduled values (weight decay, momentum) to the logs."""

    def step(model: nn.Module, batch: dict[str, Any], context: StepContext) -> StepOutput:
        objective: Objective = unwrap(model)  # type: ignore[assignment]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = step_generator(seed, context.step, rank)
        with torch.no_grad(), torch.autocast(context.device.type, enabled=False):
            global_views, local_views = augment(batch, generator)
            inputs: dict[str, Any] = {"global": global_views, "local": local_views,
                                      "boxes": batch["boxes"], "flips": batch["flips"]}
            inputs.update(objective.prepare(inputs, generator))
        if channels_last:
            for key in ("global", "local"):
                inputs[key] = inputs[key].contiguous(memory_format=torch.channels_last)
        loss, logs = model(inputs, context.step)
        values = {k: float(v) for k, v in logs.items()}
        if schedule_logs is not None:
            values.update(schedule_logs(context.step))
        return StepOutput(loss, values, batch["global"].shape[0])

    return step


@locks_run_folder
def train(config: PretrainConfig, resume: bool = False, overwrite: bool = False, stop_at: int | None = None
          ) -> PretrainResult:
    """Pretrain ``config.backbone`` with ``config.method`` on the images of ``config.data``.

    Writes into ``run_dir``: ``config.yaml``, ``metrics.jsonl`` (loss terms, lr, weight decay,
    teacher momentum, images/s), ``checkpoints/`` (student, heads, teacher, centres, queues,
    optimiser and RNG states: ``resume=True`` continues exactly), and once the last step is
    done the backbone artifact: ``weights.safetensors`` (the exported backbone, a file
    ``load_vit`` and ``--init`` read) and ``model.json`` (kind ``backbone``: architecture, the
    weights it started from, provenance, and under ``pretrain`` the images seen, epochs, seconds,
    images/s and last losses). ``stop_at`` ends early after that step (as an
    interrupted run would; for tests).
    """
    config.validate()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    images = ImageFolderDataset(config.data.images, max_side=config.data.max_side, on_error=config.data.on_error)
    crops = crop_settings(config)
    dataset = MultiCropDataset(images, crops, seed=config.seed)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    steps = total_steps(config, len(images), world_size)
    if config.init is not None and int(os.environ.get("RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    objective = build_objective(config, run_dir if int(os.environ.get("RANK", "0")) == 0 else None)
    channels_last = isinstance(objective.student, UNetBackbone)

    stage = replace(config.stages[0], steps=steps, warmup_steps=min(config.stages[0].warmup_steps, steps - 1))
    options = trainer_options(config, ScheduleConfig(optim=config.optim, stages=[stage]), device,
                              batch_size=config.data.batch_size, run_dir=run_dir, num_workers=config.data.num_workers,
                              channels_last=channels_last)

    def weight_decay(step: int) -> float:
        return cosine_schedule(step, steps, config.optim.weight_decay, config.weight_decay_end)

    def momentum(step: int) -> float:
        return cosine_schedule(step, steps, config.teacher_momentum, config.teacher_momentum_end)

    def before_optimizer_step(optimizer: torch.optim.Optimizer, step: int) -> None:
        for group in optimizer.param_groups:
            if group["params"] and all(p.ndim > 1 for p in group["params"]):  # the decayed group
                group["weight_decay"] = weight_decay(step)
        objective.before_optimizer_step(optimizer, step)

    def after_optimizer_step(model: nn.Module, step: int) -> None:
        model.momentum_update(momentum(step))  # type: ignore[operator]

    def schedule_logs(step: int) -> dict[str, float]:
        logs = {"weight_decay": weight_decay(step)}
        if objective.teacher is not None:
            logs["teacher_momentum"] = momentum(step)
        return logs

    step_fn = make_step_fn(MultiCropAugment(crops), config.seed, channels_last, schedule_logs)
    trainer = Trainer(objective, dataset, step_fn, options, collate_fn=multicrop_collate,
                      before_optimizer_step=before_optimizer_step, after_optimizer_step=after_optimizer_step)
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        if overwrite and not resume:  # outputs of the discarded run must not pass for this one's
            for name in (BACKBONE_FILE, SUMMARY_FILE):
                (run_dir / name).unlink(missing_ok=True)
    result = trainer.fit(resume=resume, overwrite=overwrite, stop_at=stop_at)

    backbone_path: Path | None = None
    summary: dict[str, Any] = {}
    if trainer.dist.is_main and result.steps >= steps:
        bare: Objective = trainer.bare_model  # type: ignore[assignment]
        which = config.export if config.method != "rotation" else "student"
        network = bare.export_network(which)
        backbone_path = export_backbone(network, run_dir / BACKBONE_FILE)
        summary = {
            "method": config.method,
            "backbone": config.backbone.kind if config.backbone.kind == "unet" else config.backbone.arch,
            "patch_size": config.backbone.patch_size if config.backbone.kind == "vit" else None,
            "exported": which,
            "init": config.init,
            "images": len(images),
            "steps": result.steps,
            "batch_size": config.data.batch_size * world_size,
            "images_seen": trainer.images_seen,
            "epochs": trainer.images_seen / len(images),
            "train_seconds": result.train_seconds,
            "images_per_second": result.images_per_second,
            "last_logs": result.last_logs or _previous_last_logs(run_dir / SUMMARY_FILE),
            "backbone_path": str(backbone_path),
        }
        backbone_config = to_dict(config.backbone)
        write_artifact_info(run_dir, "backbone", {"backbone": backbone_config}, None,
                            preprocessing=_preprocessing(network),
                            source={"init": config.init, "method": config.method, "exported": which},
                            training=provenance(to_dict(config.data)), extra={SUMMARY_KEY: summary})
    return PretrainResult(run_dir, result, backbone_path, summary)


def _preprocessing(network: nn.Module) -> dict[str, Any]:
    """What the exported backbone expects: RGB in [0, 1], normalised by the network itself."""
    inner = getattr(network, "vit", network)
    return {"input": "RGB float [B, 3, H, W] in [0, 1]; the backbone normalises itself",
            "mean": [round(float(v), 6) for v in inner.pixel_mean.flatten()],
            "std": [round(float(v), 6) for v in inner.pixel_std.flatten()]}


def _previous_last_logs(summary_path: Path) -> dict[str, float]:
    """The ``last_logs`` of an earlier summary: a resumed run that had already finished trains no
    step, and its summary must not lose the record of the steps that were trained."""
    try:
        return dict((json.loads(summary_path.read_text()).get(SUMMARY_KEY) or {}).get("last_logs") or {})
    except (OSError, ValueError, AttributeError):
        return {}
