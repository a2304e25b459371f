"""Stage 1 of weak supervision: train the classifier on image-level tags.

``train_classifier(config)`` builds the tagged training images (:mod:`.data`), the classifier of
``config.method`` (:mod:`.classifiers`: the multi-class-token ViT, the CNN CAM classifier or the
hybrid; every parameter trained), and runs the project's :class:`~labelwise.engine.trainer.Trainer`
(checkpoints, exact resume, bf16 autocast) with the multi-label soft-margin loss; batches are
flipped horizontally per image with probability ``hflip``. The final model is exported to
``run_dir`` as the project's model artifact of kind ``classifier`` (``weights.safetensors`` +
``model.json``; :func:`save_classifier`, :func:`load_classifier`, which also reads the older
``mct.safetensors`` + ``mct.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, default_collate

from labelwise.config import save_config
from labelwise.data.build import TILE_DATASETS, build_datasets
from labelwise.data.classmap import ClassMap
from labelwise.data.images import ImageFolderDataset
from labelwise.data.tags import read_tag_file
from labelwise.data.windows import TileWindows
from labelwise.engine.runtime import resolve_device, seed_everything
from labelwise.engine.trainer import StepContext, StepOutput, Trainer, TrainResult, trainer_options
from labelwise.errors import CheckpointError, ConfigError
from labelwise.io.jsonfile import read_json
from labelwise.io.run_lock import locks_run_folder
from labelwise.methods.weak.cams import WeakClassifier
from labelwise.methods.weak.classifiers import build_classifier, classifier_architecture, classifier_from_architecture
from labelwise.methods.weak.config import WeakConfig
from labelwise.methods.weak.data import TaggedImages
from labelwise.models.artifact import INFO_FILE, WEIGHTS_FILE, artifact_kind, read_artifact_files, save_artifact
from labelwise.models.cnn_cam import CNNCAMOutput, cam_loss
from labelwise.models.mctformer import mct_loss

__all__ = ["WeakClassifierResult", "load_classifier", "save_classifier", "tagged_training_images",
           "train_classifier"]

#: the classifier's description, written last: a run folder holding it has finished stage 1
SUMMARY_FILE = INFO_FILE
LEGACY_MODEL_FILE = "mct.safetensors"
LEGACY_SUMMARY_FILE = "mct.json"
#: the training record's place in ``model.json``
RECORD_KEY = "classifier"


@dataclass
class WeakClassifierResult:
    """The run folder (holding the exported classifier) and the trainer's summary."""

    run_dir: Path
    train: TrainResult


def tagged_training_images(config: WeakConfig, whole: bool = False) -> tuple[TaggedImages, ClassMap]:
    """The training images with their tags: ``images`` + the ``tags`` file, or the training
    split of ``data`` with tags from its masks. For aerial tiles the classifier trains on random
    ``data.tile_crop`` crops; ``whole=True`` (the pseudo-mask stage) gives instead every pixel of
    the training tiles once, in windows of that size (:class:`~labelwise.data.windows.TileWindows`)."""
    size = config.image_size
    if config.images:
        if not config.data.class_map:
            raise ConfigError("data.class_map: the classes.json of the tag file's class names is required "
                              "with images")
        class_map = ClassMap.from_json(config.data.class_map)
        source: Dataset = ImageFolderDataset(config.images, on_error=config.data.on_error)
        names = [str(n) for n in source.names]  # type: ignore[attr-defined]
        tags = read_tag_file(config.tags or "", class_map, names)
        return TaggedImages(source, class_map.num_classes, size, tags=tags), class_map
    splits = build_datasets(config.data, seed=config.seed)
    ignore = splits.class_map.ignore_index
    train: Dataset = splits.train
    if whole and config.data.dataset in TILE_DATASETS:
        train = TileWindows(splits.train_source, config.data.tile_crop, ignore)
    return TaggedImages(train, splits.class_map.num_classes, size, min_fraction=config.tag_min_fraction,
                        ignore_index=ignore), splits.class_map


def save_classifier(folder: str | Path, model: WeakClassifier, class_map: ClassMap,
                    record: dict[str, Any] | None = None) -> Path:
    """Export the classifier as an artifact of kind ``classifier`` (``weights.safetensors``, then
    ``model.json`` with the architecture, classes, the backbone it started from and ``record``)."""
    architecture = classifier_architecture(model)
    record = dict(record or {})
    return save_artifact(folder, "classifier", model, architecture, class_map,
                         source={"backbone": record.get("backbone")}, extra={RECORD_KEY: record})


def load_classifier(folder: str | Path) -> tuple[WeakClassifier, dict[str, Any]]:
    """The classifier exported by :func:`save_classifier` (eval mode) and its summary
    (architecture, ``class_names`` and the training record); older ``mct.*`` exports too.
    ``CheckpointError`` naming the file otherwise."""
    folder = Path(folder)
    if not (folder / INFO_FILE).is_file() and (folder / LEGACY_SUMMARY_FILE).is_file():
        summary = read_json(folder / LEGACY_SUMMARY_FILE, "classifier summary")
        weights_file = folder / LEGACY_MODEL_FILE
        try:
            state = load_file(str(weights_file))
        except (OSError, FileNotFoundError) as exc:
            raise CheckpointError(f"{weights_file}: unreadable classifier weights: {exc}") from exc
    else:
        kind = artifact_kind(folder)
        if kind != "classifier":
            raise CheckpointError(f"{folder / INFO_FILE}: " + ("missing" if kind is None else f"a {kind} model") +
                                  " (not a weak-supervision classifier folder: give the run folder of `labelwise "
                                  "weak train`)")
        info, state = read_artifact_files(folder)
        weights_file = folder / WEIGHTS_FILE
        try:
            summary = {**info["architecture"], "class_names": list(info["class_map"]["classes"]),
                       **(info.get(RECORD_KEY) or {})}
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder / INFO_FILE}: classifier description lacks {exc}") from exc
    model = classifier_from_architecture(summary, str(folder))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_file}: weights do not match the classifier's description: {exc}") from exc
    return model.eval(), summary


def _step_fn(config: WeakConfig) -> Callable[..., StepOutput]:
    def step(model: nn.Module, batch: dict[str, Any], context: StepContext) -> StepOutput:
        images, tags = batch["images"], batch["tags"]
        state = np.random.SeedSequence([config.seed, context.step, 5]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        flip = (torch.rand(images.shape[0], generator=generator) < config.hflip).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        output = model(images)
        loss = cam_loss(output, tags) if isinstance(output, CNNCAMOutput) else mct_loss(output, tags)
        # share of (image, class) tag decisions the classifier gets right at logit 0
        tag_accuracy = float(((output.scores.detach() > 0) == tags.bool()).float().mean())
        return StepOutput(loss, {"mlsm": float(loss.detach()), "tag_accuracy": tag_accuracy}, images.shape[0])

    return step


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = default_collate([{"images": i["image"], "tags": i["tags"]} for i in items])
    batch["names"] = [i["name"] for i in items]
    return batch


def _started_from(config: WeakConfig) -> str:
    """The pretrained weights the classifier started from (``model.json``'s ``source``)."""
    if config.method == "cnn_cam":
        return f"{config.encoder}:{config.encoder_weights}"
    if config.method == "hybrid":
        return f"{config.backbone}+{config.encoder}:{config.encoder_weights}"
    return config.backbone


@locks_run_folder
def train_classifier(config: WeakConfig, resume: bool = False, overwrite: bool = False,
                     stop_at: int | None = None) -> WeakClassifierResult:
    """Train and export the classifier (module docstring); resumable from ``run_dir``."""
    config.validate()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    dataset, class_map = tagged_training_images(config)
    torch.manual_seed(config.seed)
    model = build_classifier(config, class_map.num_classes)
    options = trainer_options(config, config.schedule(), device, batch_size=config.batch_size,
                              batch_size_key="batch_size", run_dir=run_dir,
                              lr_scale=lambda name: config.new_lr_scale if model.is_new_parameter(name) else 1.0)
    trainer = Trainer(model, dataset, _step_fn(config), options, collate_fn=_collate)
    if trainer.dist.is_main:  # under torchrun, rank 0 writes the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    result = trainer.fit(resume=resume, overwrite=overwrite, stop_at=stop_at)
    if trainer.dist.is_main and result.steps >= config.total_steps:
        save_classifier(run_dir, trainer.bare_model, class_map,  # type: ignore[arg-type]
                        {"method": config.method, "backbone": _started_from(config), "steps": result.steps,
                         "train_seconds": round(result.train_seconds, 2)})
    return WeakClassifierResult(run_dir, result)
