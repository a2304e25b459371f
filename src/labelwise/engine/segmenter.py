"""Supervised training of a segmentation model: the loop ``labelwise train`` runs, also used by
the regimes that end by training a segmenter on labels they made (self-training rounds, the weak
pipeline's pseudo-masks) and by the semi-supervised consistency methods for their pieces
(class weights, augmenters, trainer options)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from labelwise.config import TrainConfig, save_config, to_dict
from labelwise.data import PairedAugment, class_balanced_weights, class_frequencies, pad_collate
from labelwise.data.build import TILE_DATASETS, DataSplits, build_datasets, data_channels
from labelwise.data.transforms import scale_batch
from labelwise.data.wide_context import WideContextCrops, scale_and_augment_with_context
from labelwise.engine.runtime import resolve_device, seed_everything
from labelwise.engine.trainer import StepContext, StepOutput, Trainer, TrainerOptions, TrainResult
from labelwise.engine.trainer import trainer_options as engine_trainer_options
from labelwise.errors import ConfigError
from labelwise.eval.evaluate import evaluate_model
from labelwise.io.atomic import atomic_write_json
from labelwise.io.run_lock import locks_run_folder
from labelwise.losses import WeightedSumLoss, build_loss
from labelwise.models import create
from labelwise.models.export import export_model
from labelwise.models.init import configure_encoder, encoder_lr_scale, initialise_from

__all__ = ["SupervisedResult", "context_loss_weight", "loss_class_weights", "make_augmenters", "make_step_fn",
           "make_wide_context_step_fn", "segmenter_options", "train_segmenter", "trainer_options",
           "wide_context_windows"]


@dataclass
class SupervisedResult:
    """Outcome of :func:`train`: the exported model folder, training summary and val metrics."""

    run_dir: Path
    train: TrainResult
    metrics: dict[str, Any]


def loss_class_weights(config: TrainConfig, splits: DataSplits) -> torch.Tensor | None:
    """Class weights of the loss: none, explicit, or balanced from training-label frequencies."""
    weights = config.loss.class_weights
    num_classes = splits.class_map.num_classes
    if weights == "none":
        return None
    if weights == "balanced":
        counts = class_frequencies(splits.train_source, num_classes, splits.class_map.ignore_index)
        return class_balanced_weights(counts, method=config.loss.balance_method)
    if len(weights) != num_classes:
        raise ConfigError(f"loss.class_weights: {len(weights)} weights given for {num_classes} classes")
    return torch.tensor(weights, dtype=torch.float32)


def trainer_options(config: TrainConfig, run_dir: Path, device: torch.device, model: nn.Module | None = None
                    ) -> TrainerOptions:
    """The Trainer's loop settings from a ``TrainConfig``; ``model`` (the module the trainer
    optimises) is needed for ``model.encoder_lr_scale``."""
    return engine_trainer_options(
        config, config, device, batch_size=config.data.batch_size, run_dir=run_dir,
        lr_scale=encoder_lr_scale(model, config.model.encoder_lr_scale) if model is not None else None,
        channels_last=config.channels_last, num_workers=config.data.num_workers, eval_every=config.eval.every)


def make_augmenters(stages: Sequence[Any], ignore_index: int) -> list[PairedAugment]:
    return [PairedAugment(stage.augment, ignore_index=ignore_index) for stage in stages]


def make_step_fn(loss_fn: WeightedSumLoss, augmenters: list[PairedAugment], channels_last: bool = False):
    """Step function: resize to the stage's input scale, augment, forward, loss."""

    def step(model: nn.Module, batch: dict[str, Any], context: StepContext) -> StepOutput:
        images, masks = batch["image"], batch["mask"]
        with torch.autocast(device_type=context.device.type, enabled=False):
            images, masks = scale_batch(images, masks, context.stage.input_scale)
            images, masks = augmenters[context.stage_index](images, masks)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        output = model(images)
        total, parts = loss_fn(output, masks)
        return StepOutput(total, {k: float(v.detach()) for k, v in parts.items()}, images.shape[0])

    return step


def wide_context_windows(config: TrainConfig, crops: Any, context_scale: float) -> WideContextCrops:
    """The training windows of a ``wide_context`` model: ``crops`` (random crops of whole tiles)
    with their contexts.

    Raises:
        ConfigError: the dataset has no tiles, or a stage crops again (the window is the crop).
    """
    if config.data.dataset not in TILE_DATASETS:
        raise ConfigError(f"model.name: wide_context trains on windows of whole tiles ({', '.join(TILE_DATASETS)} "
                          f"datasets); the dataset is {config.data.dataset!r}")
    cropping = [i for i, stage in enumerate(config.stages) if stage.augment.crop_size is not None]
    if cropping:
        raise ConfigError(f"stages.{cropping[0]}.augment.crop_size: must be null for wide_context (data.tile_crop "
                          "is the window)")
    return WideContextCrops(crops, context_scale)


def context_loss_weight(weight: float, step: int, total_steps: int) -> float:
    """WiCoNet's auxiliary context-loss weight at ``step``: ``weight * (1 - step / total_steps) ** 2``."""
    return weight * (1.0 - step / max(total_steps, 1)) ** 2


def make_wide_context_step_fn(loss_fn: WeightedSumLoss, augmenters: list[PairedAugment], channels_last: bool,
                              context_scale: float, context_weight: float, total_steps: int):
    """Step function of a ``wide_context`` model: input scale and one augmentation for windows and
    their contexts alike, then the loss of the window plus ``context_weight * (1 - step /
    total_steps) ** 2`` times the same loss on the context's labels (WiCoNet's auxiliary loss)."""

    def step(model: nn.Module, batch: dict[str, Any], context: StepContext) -> StepOutput:
        images, masks = batch["image"], batch["mask"]
        context_masks = torch.stack(batch["context_mask"]).to(masks.device)
        with torch.autocast(device_type=context.device.type, enabled=False):
            images, masks, context_masks = scale_and_augment_with_context(
                augmenters[context.stage_index], images, masks, context_masks, context.stage.input_scale, context_scale)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        output = model(images)
        total, parts = loss_fn(output.logits, masks)
        context_total, _ = loss_fn(output.context_logits, context_masks)
        weight = context_loss_weight(context_weight, context.step, total_steps)
        logs = {k: float(v.detach()) for k, v in parts.items()}
        logs.update({"context_loss": float(context_total.detach()), "context_weight": weight})
        return StepOutput(total + weight * context_total, logs, images.shape[0])

    return step


def segmenter_options(config: TrainConfig) -> dict[str, Any]:
    """``config.model.options`` with ``in_channels`` set from the data (4 for ISPRS RGBIR tiles;
    a pretrained encoder's first convolution is then extended, its RGB kernels kept).

    Raises:
        ConfigError: ``model.options.in_channels`` contradicts the data's band count.
    """
    options = dict(config.model.options)
    channels = data_channels(config.data)
    given = options.get("in_channels")
    if given is None:
        if channels != 3:
            options["in_channels"] = channels
    elif given != channels:
        raise ConfigError(f"model.options.in_channels: {given}, but the data gives {channels}-band images "
                          f"(data.bands {config.data.bands}); leave in_channels out or make them agree")
    return options


@locks_run_folder
def train_segmenter(config: TrainConfig, resume: bool = False, overwrite: bool = False, stop_at: int | None = None,
                    splits: DataSplits | None = None) -> SupervisedResult:
    """Train ``config.model`` on ``config.data``; export it and its val metrics to ``run_dir``.

    Writes ``run_dir/config.yaml``, ``metrics.jsonl`` (training log), ``checkpoints/``,
    ``weights.safetensors`` + ``model.json`` (the final model) and ``eval.json`` (val metrics).
    ``splits`` replaces the datasets ``config.data`` describes (e.g. labeled + pseudo-labeled
    images in self-training); class weights then come from its ``train_source``.
    """
    config.validate()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    splits = splits or build_datasets(config.data, seed=config.seed)
    class_map = splits.class_map
    model = create(config.model.name, num_classes=class_map.num_classes, **segmenter_options(config))
    configure_encoder(model, config.model)
    loss_fn = build_loss(
        [{"name": t.name, "weight": t.weight} for t in config.loss.terms],
        num_classes=class_map.num_classes,
        ignore_index=class_map.ignore_index,
        class_weights=loss_class_weights(config, splits),
    ).to(device)
    augmenters = make_augmenters(config.stages, class_map.ignore_index)
    train_set = splits.train
    if config.model.name == "wide_context":
        train_set = wide_context_windows(config, splits.train, model.context_scale)  # type: ignore[arg-type]
        step_fn = make_wide_context_step_fn(loss_fn, augmenters, config.channels_last, model.context_scale,
                                            config.loss.context_weight, config.total_steps)
    else:
        step_fn = make_step_fn(loss_fn, augmenters, config.channels_last)

    def eval_fn(bare: nn.Module, step: int) -> dict[str, float]:
        metrics = evaluate_model(bare, splits.val, class_map.num_classes, config.eval, device, config.precision,
                                 class_map.ignore_index)
        return {"miou": metrics.miou, "pixel_acc": metrics.pixel_acc}

    options = trainer_options(config, run_dir, device, model)
    trainer = Trainer(model, train_set, step_fn, options, collate_fn=pad_collate,
                      eval_fn=eval_fn if config.eval.every else None)
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    if config.model.init and not resume:  # on resume the checkpoint's weights win
        initialise_from(trainer.bare_model, config.model.init, run_dir=run_dir if trainer.dist.is_main else None,
                        verbose=trainer.dist.is_main)
    result = trainer.fit(resume=resume, overwrite=overwrite, stop_at=stop_at)
    metrics: dict[str, Any] = {}
    if trainer.dist.is_main and result.steps >= config.total_steps:
        bare = trainer.bare_model
        export_model(run_dir, bare, class_map, config.eval, extra={"train_config": "config.yaml"},
                     data=to_dict(config.data), init=config.model.init)
        evaluation = evaluate_model(bare, splits.val, class_map.num_classes, config.eval, device, config.precision,
                                    class_map.ignore_index)
        metrics = evaluation.to_dict(list(class_map.names))
        metrics.update({"train_seconds": result.train_seconds, "images_per_second": result.images_per_second,
                        "steps": result.steps})
        atomic_write_json(run_dir / "eval.json", metrics)
    return SupervisedResult(run_dir, result, metrics)
