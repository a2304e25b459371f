"""Supervised segmentation: train on fully labeled images, evaluate, predict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from labelwise.config import (
    AugmentConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    LossTerm,
    ModelConfig,
    StageConfig,
    TrainConfig,
)
from labelwise.data.build import DataSplits, build_eval_dataset
from labelwise.engine.segmenter import SupervisedResult, train_segmenter
from labelwise.eval.metrics import SegmentationMetrics
from labelwise.inference import load, predict_files, segmenter_metrics
from labelwise.report import write_rgb_png


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False, stop_at: int | None = None,
          splits: DataSplits | None = None) -> SupervisedResult:
    """Train ``config.model`` on ``config.data``; export it and its val metrics to ``run_dir``
    (see :func:`labelwise.engine.segmenter.train_segmenter`)."""
    return train_segmenter(config, resume=resume, overwrite=overwrite, stop_at=stop_at, splits=splits)


def evaluate(model_path: str | Path, config: TrainConfig, split: str | None = None, device: str = "auto",
             precision: str = "bf16", eval_config: EvalConfig | None = None) -> SegmentationMetrics:
    """Evaluate an exported model on a split of ``config.data`` (default: its ``val_split``)."""
    dataset, _ = build_eval_dataset(config.data, split)
    return segmenter_metrics(load(model_path, device, precision), dataset, eval_config)


def predict(model_path: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, device: str = "auto",
            precision: str = "bf16", eval_config: EvalConfig | None = None, alpha: float = 0.5) -> list[Path]:
    """Segment every image in ``inputs``; write ``ids/``, ``color/`` and ``overlay/`` PNGs per image
    under ``out_dir``. Returns the written class-id PNG paths."""
    return predict_files(load(model_path, device, precision), inputs, out_dir, eval_config, alpha=alpha)


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
         progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Train and evaluate a small U-Net on synthetic data, then predict its val images (the
    supervised part of ``labelwise demo``, :mod:`labelwise.demo`).

    Writes under ``run_dir``: the trained model, ``eval.json`` (val metrics), the val images as
    PNGs in ``images/`` and their predictions in ``predictions/{ids,color,overlay}/``. Returns the
    metrics (and prints a summary unless ``quiet``).
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
    if not quiet:
        summary = {"run_dir": str(run_dir), "miou": result.metrics.get("miou"),
                   "pixel_acc": result.metrics.get("pixel_acc"), "train_seconds": result.train.train_seconds}
        print(json.dumps(summary, indent=2))
    return result.metrics
