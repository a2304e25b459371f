"""``labelwise semi train``: semi-supervised training by method name.

- ``supervised_only``: the ordinary supervised pipeline on the labeled subset
  (``data.train_list``), the baseline every table needs.
- ``fixmatch`` / ``unimatch``: the Trainer runs :func:`~.steps.make_consistency_step` on
  :class:`~.data.LabeledUnlabeledPairs`; the model is a :class:`~.model.SemiModel` (student,
  optional EMA teacher updated after every optimiser step, optional rotation head), checkpointed
  whole, so ``--resume`` is exact. The student is exported like any labelwise model
  (``weights.safetensors`` + ``model.json``) and scored on the validation split (``eval.json``).
- ``self_training``: round 0 trains the student on the labeled subset; each later round
  pseudo-labels every unlabeled image with the previous round's model (argmax at full
  resolution with the evaluation settings; pixels below ``semi.self_training_threshold`` ignored) and trains a
  fresh model (same initialisation) on the labeled images, repeated to match the number of
  pseudo-labeled ones (ST++), plus the pseudo-labeled images. Each round is a
  complete supervised run in ``run_dir/round<k>``; finished rounds are skipped on resume. The last
  round's model is copied to ``run_dir``; its ``eval.json`` carries the training seconds of all
  rounds. ``semi.teacher`` (``--teacher``) replaces round 0 by a finished model, e.g. the
  ``supervised_only`` run on the same labeled subset.

``model.init`` (``--init``) initialises the student's encoder from a self-supervised checkpoint
(U-Net encoders and ViTs, :mod:`labelwise.models.init`) before training starts.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from labelwise.config import save_config, to_dict
from labelwise.data import RandomCropDataset
from labelwise.data.build import DataSplits, build_datasets
from labelwise.data.splits import dataset_names
from labelwise.data.tile_sources import RelabeledTiles, TileUnion
from labelwise.engine.runtime import resolve_device, seed_everything
from labelwise.engine.segmenter import (
    SupervisedResult,
    loss_class_weights,
    make_augmenters,
    segmenter_options,
    train_segmenter,
    trainer_options,
    wide_context_windows,
)
from labelwise.engine.trainer import Trainer, TrainResult
from labelwise.errors import ConfigError
from labelwise.eval.evaluate import evaluate_model, make_logits_fn, predict_batch
from labelwise.io.atomic import atomic_path, atomic_write_json
from labelwise.io.run_lock import locks_run_folder
from labelwise.losses import build_loss
from labelwise.methods.semi.config import SemiConfig
from labelwise.methods.semi.data import (
    ImagesOnly,
    LabeledUnlabeledPairs,
    pair_collate,
    unlabeled_images,
    unlabeled_tiles,
)
from labelwise.methods.semi.model import SemiModel
from labelwise.methods.semi.perturb import confident_pseudo_labels
from labelwise.methods.semi.steps import WideContextTraining, make_consistency_step
from labelwise.models import create
from labelwise.models.artifact import INFO_FILE, LEGACY_WEIGHTS, WEIGHTS_FILE
from labelwise.models.export import export_model, load_model
from labelwise.models.init import configure_encoder
from labelwise.models.wide_context import WideContextSegmenter

__all__ = ["PseudoLabeled", "SemiResult", "pseudo_label", "train"]



@dataclass
class SemiResult:
    """The run folder (holding the exported model), the last training summary, val metrics."""

    run_dir: Path
    train: TrainResult
    metrics: dict[str, Any]


@locks_run_folder
def train(config: SemiConfig, resume: bool = False, overwrite: bool = False, stop_at: int | None = None
          ) -> SemiResult:
    """Train by ``config.semi.method`` (module docstring)."""
    config.validate()
    method = config.semi.method
    if method == "supervised_only":
        result = train_segmenter(config, resume=resume, overwrite=overwrite, stop_at=stop_at)
        return SemiResult(result.run_dir, result.train, result.metrics)
    if method == "self_training":
        return _self_training(config, resume=resume, overwrite=overwrite)
    return _consistency(config, resume=resume, overwrite=overwrite, stop_at=stop_at)


def _rotation_channels(student: nn.Module) -> int:
    size = max(64, 2 * int(getattr(student, "output_stride", 1)))
    bands = int(getattr(student, "in_channels", 3)) * (2 if isinstance(student, WideContextSegmenter) else 1)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        channels = int(student.encode(torch.zeros(1, bands, size, size))[-1].shape[1])
    student.train(was_training)
    return channels


def _consistency(config: SemiConfig, resume: bool, overwrite: bool, stop_at: int | None) -> SemiResult:
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    splits = build_datasets(config.data, seed=config.seed)
    class_map = splits.class_map
    student = create(config.model.name, num_classes=class_map.num_classes, **segmenter_options(config))
    configure_encoder(student, config.model)
    labeled, scale, wide = splits.train, None, None
    if isinstance(student, WideContextSegmenter):
        scale = student.context_scale
        labeled = wide_context_windows(config, splits.train, scale)
        wide = WideContextTraining(scale, config.loss.context_weight, config.total_steps)
    unlabeled = unlabeled_images(config, dataset_names(splits.train_source), context_scale=scale)
    pairs = LabeledUnlabeledPairs(labeled, unlabeled, seed=config.seed)
    if config.model.init and not resume:
        from labelwise.models.init import initialise_from

        main = int(os.environ.get("RANK", "0")) == 0  # one init report per run, not per torchrun rank
        initialise_from(student, config.model.init, run_dir=run_dir if main else None, verbose=main)
    rotation = _rotation_channels(student) if config.semi.rotation_weight > 0 else None
    model = SemiModel(student, ema_teacher=config.semi.ema_teacher, rotation_features=rotation)
    loss_fn = build_loss([{"name": t.name, "weight": t.weight} for t in config.loss.terms],
                         num_classes=class_map.num_classes, ignore_index=class_map.ignore_index,
                         class_weights=loss_class_weights(config, splits)).to(device)
    augmenters = make_augmenters(config.stages, class_map.ignore_index)
    step_fn = make_consistency_step(config.semi, loss_fn, augmenters, class_map.ignore_index, config.seed,
                                    config.channels_last, wide_context=wide)

    def eval_fn(bare: nn.Module, step: int) -> dict[str, float]:
        metrics = evaluate_model(bare.student, splits.val, class_map.num_classes, config.eval,  # type: ignore[arg-type]
                                 device, config.precision, class_map.ignore_index)
        return {"miou": metrics.miou, "pixel_acc": metrics.pixel_acc}

    momentum = config.semi.ema_momentum
    options = trainer_options(config, run_dir, device, model)
    trainer = Trainer(model, pairs, step_fn, options,
                      collate_fn=partial(pair_collate, ignore_index=class_map.ignore_index),
                      eval_fn=eval_fn if config.eval.every else None,
                      after_optimizer_step=(lambda bare, step: bare.update_teacher(momentum))
                      if config.semi.ema_teacher else None)
    if trainer.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    result = trainer.fit(resume=resume, overwrite=overwrite, stop_at=stop_at)
    metrics: dict[str, Any] = {}
    if trainer.dist.is_main and result.steps >= config.total_steps:
        bare: SemiModel = trainer.bare_model  # type: ignore[assignment]
        export_model(run_dir, bare.student, class_map, config.eval, data=to_dict(config.data), init=config.model.init,
                     extra={"train_config": "config.yaml", "semi_method": config.semi.method})
        evaluation = evaluate_model(bare.student, splits.val, class_map.num_classes, config.eval, device,
                                    config.precision, class_map.ignore_index)
        metrics = evaluation.to_dict(list(class_map.names))
        metrics.update({"train_seconds": result.train_seconds, "steps": result.steps,
                        "labeled_images": len(splits.train), "unlabeled_images": len(unlabeled)})  # type: ignore[arg-type]
        atomic_write_json(run_dir / "eval.json", metrics)
    return SemiResult(run_dir, result, metrics)


class PseudoLabeled(Dataset):
    """Unlabeled images with pseudo-label masks: ``{"image", "mask", "name"}`` samples."""

    def __init__(self, images: Dataset, masks: list[np.ndarray]) -> None:
        if len(images) != len(masks):  # type: ignore[arg-type]
            raise ValueError(f"{len(images)} images but {len(masks)} pseudo-label masks")  # type: ignore[arg-type]
        self.images = images
        self.masks = masks
        self.names = dataset_names(images)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.images[index]
        return {"image": sample["image"], "mask": torch.from_numpy(self.masks[index].astype(np.int64)),
                "name": str(sample["name"])}


@torch.no_grad()
def pseudo_label(model: nn.Module, images: Dataset, config: SemiConfig, ignore_index: int,
                 device: torch.device) -> tuple[list[np.ndarray], float]:
    """Pseudo-label masks (uint8 / uint16 ``[H, W]``) of every image at its own size, with the
    evaluation settings; pixels below ``semi.self_training_threshold``, and a crop's padding outside its
    tile (``"valid"`` of :class:`~.data.ImagesOnly`), are ``ignore_index``. Also returns the confident
    fraction of all pixels."""
    model.eval()
    logits_fn = make_logits_fn(model, device, config.precision, config.eval.input_scale, config.eval.flip)
    num_classes = int(getattr(model, "num_classes"))
    masks: list[np.ndarray] = []
    confident = total = 0
    dtype = np.uint8 if max(num_classes, ignore_index) < 256 else np.uint16
    for index in range(len(images)):  # type: ignore[arg-type]
        sample = images[index]
        image = sample["image"][None].to(device)
        valid = sample["valid"][None].to(device) if "valid" in sample else None
        logits = predict_batch(logits_fn, image, num_classes, config.eval)
        labels = confident_pseudo_labels(torch.softmax(logits, 1), config.semi.self_training_threshold, valid,
                                         ignore_index)[0]
        confident += int((labels != ignore_index).sum())
        total += labels.numel()
        masks.append(labels.cpu().numpy().astype(dtype))
    return masks, confident / max(1, total)


def _model_files(folder: Path) -> list[Path]:
    """The files of a finished round in the order they are copied (weights, then ``model.json``,
    then ``eval.json``); an older round folder's ``model.safetensors`` stands for the weights."""
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() and (folder / LEGACY_WEIGHTS).is_file():
        weights = folder / LEGACY_WEIGHTS
    return [weights, folder / INFO_FILE, folder / "eval.json"]


def _round_done(folder: Path) -> bool:
    return all(path.is_file() for path in _model_files(folder))


def _teacher_round(config: SemiConfig, class_map: Any) -> dict[str, Any]:
    """Round 0's record for a given ``semi.teacher``; checks that it loads and that its classes match."""
    path = Path(str(config.semi.teacher))
    teacher = load_model(path)
    if teacher.class_map.names != class_map.names:
        raise ConfigError(f"semi.teacher: {path} predicts classes {list(teacher.class_map.names)}, the data has "
                          f"{list(class_map.names)}")
    info: dict[str, Any] = {"round": 0, "teacher": str(path)}
    if (path / "eval.json").is_file():
        metrics = json.loads((path / "eval.json").read_text())
        info.update({"miou": metrics.get("miou"), "train_seconds": metrics.get("train_seconds", 0.0)})
    return info


def _pseudo_labeled_tiles(config: SemiConfig, splits: DataSplits, tiles: Any, masks: list[np.ndarray]) -> DataSplits:
    """Training crops of the labeled tiles and of ``tiles`` with ``masks`` as labels; the labeled
    tiles are listed as often as it takes for their area to match the pseudo-labeled area (ST++'s
    repetition, by area because crops are drawn by area)."""
    labeled = splits.train_source
    pseudo = RelabeledTiles(tiles, masks)
    labeled_area = sum(h * w for h, w in (labeled.image_size(i) for i in range(len(labeled))))  # type: ignore
    pseudo_area = sum(int(m.size) for m in masks)
    repeats = max(1, round(pseudo_area / max(labeled_area, 1)))
    union = TileUnion([labeled] * repeats + [pseudo])  # type: ignore[list-item]
    crops = RandomCropDataset(union, crop_size=config.data.tile_crop, samples_per_epoch=2 * len(splits.train),
                              seed=config.seed)  # type: ignore[arg-type]
    return DataSplits(crops, splits.val, splits.class_map, union)


def _self_training(config: SemiConfig, resume: bool, overwrite: bool) -> SemiResult:
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    splits = build_datasets(config.data, seed=config.seed)
    wide = config.model.name == "wide_context"
    # a wide-context model pseudo-labels whole tiles (every window with its context) and trains
    # on windows of them, as it trains on labeled tiles
    unlabeled = (ImagesOnly(unlabeled_tiles(config)) if wide
                 else unlabeled_images(config, dataset_names(splits.train_source)))
    rounds: list[dict[str, Any]] = []
    result: SupervisedResult | None = None
    if config.semi.teacher is not None:
        rounds.append(_teacher_round(config, splits.class_map))
    record = run_dir / "self_training.json"
    previous = {r["round"]: r for r in json.loads(record.read_text())["rounds"]} if record.is_file() else {}
    for k in range(len(rounds), config.semi.rounds + 1):
        folder = run_dir / f"round{k}"
        round_config = copy.deepcopy(config)
        round_config.run_dir = str(folder)
        round_splits = splits
        info: dict[str, Any] = {"round": k, "labeled_images": len(splits.train)}  # type: ignore[arg-type]
        if _round_done(folder) and not overwrite and k in previous:
            rounds.append(previous[k])  # finished before a resume: not pseudo-labeled again
            continue
        if k > 0:
            source = Path(config.semi.teacher) if k == 1 and config.semi.teacher else run_dir / f"round{k - 1}"
            teacher = load_model(source).model.to(device)
            masks, fraction = pseudo_label(teacher, unlabeled, config, splits.class_map.ignore_index, device)
            if wide:
                round_splits = _pseudo_labeled_tiles(config, splits, unlabeled.source, masks)  # type: ignore[attr-defined]
            else:
                pseudo = PseudoLabeled(unlabeled, masks)
                # the labeled images repeated to match the pseudo-labeled ones (as ST++ does), so
                # that the real labels keep half the weight however few they are
                repeats = max(1, math.ceil(len(pseudo) / len(splits.train)))  # type: ignore[arg-type]
                combined = ConcatDataset([splits.train] * repeats + [pseudo])
                round_splits = DataSplits(combined, splits.val, splits.class_map, combined)  # type: ignore[arg-type]
            info.update({"pseudo_labeled_images": len(masks), "confident_fraction": round(fraction, 4)})
        if _round_done(folder) and not overwrite:
            metrics = json.loads((folder / "eval.json").read_text())
            info.update({"miou": metrics["miou"], "train_seconds": metrics.get("train_seconds", 0.0)})
            rounds.append(info)
            continue
        result = train_segmenter(round_config, resume=resume and (folder / "checkpoints").is_dir(),
                                  overwrite=overwrite, splits=round_splits)
        info.update({"miou": result.metrics.get("miou"), "train_seconds": result.train.train_seconds})
        rounds.append(info)
        atomic_write_json(run_dir / "self_training.json", {"rounds": rounds})
    last = run_dir / f"round{config.semi.rounds}"
    for path in _model_files(last):  # each file whole (atomic), model.json after the weights
        with atomic_path(run_dir / path.name) as tmp:
            shutil.copyfile(path, tmp)
    atomic_write_json(run_dir / "self_training.json", {"rounds": rounds})
    metrics = json.loads((run_dir / "eval.json").read_text())
    # the row's cost is every round's training, the given teacher's included
    metrics["last_round_train_seconds"] = metrics.get("train_seconds", 0.0)
    metrics["train_seconds"] = float(sum(r.get("train_seconds") or 0.0 for r in rounds))
    atomic_write_json(run_dir / "eval.json", metrics)
    train_summary = result.train if result is not None else TrainResult(0, 0.0, 0.0, {}, {})
    return SemiResult(run_dir, train_summary, metrics)
