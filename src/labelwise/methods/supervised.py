"""Supervised segmentation: train on fully labelled images, evaluate, predict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from labelwise.config import (
    AugmentConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    LossTerm,
    ModelConfig,
    StageConfig,
    TrainConfig,
    save_config,
)
from labelwise.data import PairedAugment, class_balanced_weights, class_frequencies, pad_collate, read_image
from labelwise.data.transforms import scale_batch
from labelwise.engine.atomic import atomic_write_json
from labelwise.engine.runtime import resolve_device
from labelwise.engine.trainer import StepContext, StepOutput, Trainer, TrainerOptions, TrainResult
from labelwise.errors import ConfigError, DataError
from labelwise.eval.evaluate import evaluate_model, make_logits_fn, predict_batch
from labelwise.eval.metrics import SegmentationMetrics
from labelwise.losses import WeightedSumLoss, build_loss
from labelwise.methods.common import DataSplits, build_datasets, build_eval_dataset, export_model, load_model, seed_everything
from labelwise.methods.transfer import configure_encoder
from labelwise.models import create
from labelwise.report import write_prediction_pngs, write_rgb_png

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


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
    from labelwise.methods.transfer import encoder_lr_scale

    return TrainerOptions(
        lr_scale=encoder_lr_scale(model, config.model.encoder_lr_scale) if model is not None else None,
        stages=config.stages, optim=config.optim, run_dir=run_dir, device=device, precision=config.precision,
        channels_last=config.channels_last, seed=config.seed, batch_size=config.data.batch_size,
        num_workers=config.data.num_workers, checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints, log_every=config.log_every, eval_every=config.eval.every,
        progress=config.progress,
    )


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


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False, stop_at: int | None = None,
          splits: DataSplits | None = None) -> SupervisedResult:
    """Train ``config.model`` on ``config.data``; export it and its val metrics to ``run_dir``.

    Writes ``run_dir/config.yaml``, ``metrics.jsonl`` (training log), ``checkpoints/``,
    ``model.safetensors`` + ``model.json`` (the final model) and ``eval.json`` (val metrics).
    ``splits`` replaces the datasets ``config.data`` describes (e.g. labelled + pseudo-labelled
    images in self-training); class weights then come from its ``train_source``.
    """
    config.validate()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    splits = splits or build_datasets(config.data, seed=config.seed)
    class_map = splits.class_map
    model = create(config.model.name, num_classes=class_map.num_classes, **config.model.options)
    configure_encoder(model, config.model)
    loss_fn = build_loss(
        [{"name": t.name, "weight": t.weight} for t in config.loss.terms],
        num_classes=class_map.num_classes,
        ignore_index=class_map.ignore_index,
        class_weights=loss_class_weights(config, splits),
    ).to(device)
    step_fn = make_step_fn(loss_fn, make_augmenters(config.stages, class_map.ignore_index), config.channels_last)

    def eval_fn(bare: nn.Module, step: int) -> dict[str, float]:
        metrics = evaluate_model(bare, splits.val, class_map.num_classes, config.eval, device, config.precision,
                                 class_map.ignore_index)
        return {"miou": metrics.miou, "pixel_acc": metrics.pixel_acc}

    options = trainer_options(config, run_dir, device, model)
    trainer = Trainer(model, splits.train, step_fn, options, collate_fn=pad_collate,
                      eval_fn=eval_fn if config.eval.every else None)
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    if config.model.init and not resume:  # on resume the checkpoint's weights win
        from labelwise.methods.transfer import initialise_from

        initialise_from(trainer.bare_model, config.model.init, run_dir=run_dir if trainer.dist.is_main else None,
                        verbose=trainer.dist.is_main)
    result = trainer.fit(resume=resume, overwrite=overwrite, stop_at=stop_at)
    metrics: dict[str, Any] = {}
    if trainer.dist.is_main and result.steps >= config.total_steps:
        bare = trainer.bare_model
        export_model(run_dir, bare, class_map, config.eval, extra={"train_config": "config.yaml"})
        evaluation = evaluate_model(bare, splits.val, class_map.num_classes, config.eval, device, config.precision,
                                    class_map.ignore_index)
        metrics = evaluation.to_dict(list(class_map.names))
        metrics.update({"train_seconds": result.train_seconds, "images_per_second": result.images_per_second,
                        "steps": result.steps})
        atomic_write_json(run_dir / "eval.json", metrics)
    return SupervisedResult(run_dir, result, metrics)


def evaluate(model_path: str | Path, config: TrainConfig, split: str | None = None, device: str = "auto",
             precision: str = "bf16", eval_config: EvalConfig | None = None) -> SegmentationMetrics:
    """Evaluate an exported model on a split of ``config.data`` (default: its ``val_split``)."""
    loaded = load_model(model_path)
    torch_device = resolve_device(device)
    dataset, class_map = build_eval_dataset(config.data, split)
    if class_map.names != loaded.class_map.names:
        raise ConfigError(
            f"the model at {model_path} predicts classes {list(loaded.class_map.names)}, "
            f"the dataset has {list(class_map.names)}"
        )
    model = loaded.model.to(torch_device)
    return evaluate_model(model, dataset, class_map.num_classes, eval_config or loaded.eval_config, torch_device,
                          precision, class_map.ignore_index)


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named in ``inputs`` (files, or folders whose image files are taken, sorted)."""
    files: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{entry}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif entry.is_file():
            files.append(entry)
        else:
            raise DataError(f"{entry}: no such file or folder")
    return files


@torch.no_grad()
def predict(model_path: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, device: str = "auto",
            precision: str = "bf16", eval_config: EvalConfig | None = None, alpha: float = 0.5) -> list[Path]:
    """Segment every image in ``inputs``; write ``ids/``, ``color/`` and ``overlay/`` PNGs per image
    under ``out_dir``. Returns the written class-id PNG paths."""
    loaded = load_model(model_path)
    torch_device = resolve_device(device)
    model = loaded.model.to(torch_device)
    config = eval_config or loaded.eval_config
    logits_fn = make_logits_fn(model, torch_device, precision, config.input_scale, config.flip)
    written = []
    for path in list_images(inputs):
        image = read_image(path)
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(torch_device)
        prediction = predict_batch(logits_fn, tensor, loaded.class_map.num_classes, config).argmax(1)[0]
        paths = write_prediction_pngs(prediction.cpu().numpy(), image, loaded.class_map, Path(out_dir), path.stem,
                                      alpha)
        written.append(paths["ids"])
    return written


def demo_config(run_dir: str = "runs/demo", steps: int = 300, device: str = "auto", precision: str = "bf16"
                ) -> TrainConfig:
    """A small U-Net on the embedded synthetic dataset: trains in about 30 seconds on 2 CPU cores."""
    return TrainConfig(
        data=DataConfig(dataset="synthetic", batch_size=8, synthetic_train_images=96, synthetic_val_images=16),
        model=ModelConfig("unet", {"width": 16, "depth": 3}),
        loss=LossConfig(terms=[LossTerm("ce", 1.0), LossTerm("dice", 0.5)]),
        stages=[StageConfig(steps=steps, lr=3e-3, schedule="poly", warmup_steps=min(20, steps // 10),
                            augment=AugmentConfig(hflip=0.5, rotate_degrees=10.0, scale=(0.8, 1.25),
                                                  brightness=0.2, contrast=0.2))],
        run_dir=run_dir, device=device, precision=precision, checkpoint_every=max(steps // 2, 1), log_every=10,
    )


def demo(run_dir: str | Path = "runs/demo", steps: int = 300, device: str = "auto", precision: str = "bf16",
         progress: bool = True) -> dict[str, Any]:
    """Train and evaluate a small U-Net on synthetic data, then predict its val images.

    Writes under ``run_dir``: the trained model, ``eval.json`` (val metrics), the val images as
    PNGs in ``images/`` and their predictions in ``predictions/{ids,color,overlay}/``. Returns the
    metrics.
    """
    config = demo_config(str(run_dir), steps, device, precision)
    config.progress = progress
    result = train(config, overwrite=True)
    image_dir = Path(run_dir) / "images"
    val, _ = build_eval_dataset(config.data)
    for index in range(len(val)):
        sample = val[index]
        array = (sample["image"].permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        write_rgb_png(array, image_dir / f"{sample['name']}.png")
    predict(run_dir, [image_dir], Path(run_dir) / "predictions", device=device, precision=precision)
    summary = {"run_dir": str(run_dir), "miou": result.metrics.get("miou"), "pixel_acc": result.metrics.get("pixel_acc"),
               "train_seconds": result.train.train_seconds}
    print(json.dumps(summary, indent=2))
    return result.metrics
