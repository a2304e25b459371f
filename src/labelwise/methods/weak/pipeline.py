"""``weak run``: every stage of weak supervision in one call, each resumable.

1. the multi-class-token ViT classifier on the tags (:func:`~.train.train_classifier`; skipped
   when ``run_dir`` already holds its export);
2-3. CAMs and pseudo-masks of every training image (:func:`~.stages.make_pseudo_masks`) into
   ``run_dir/pseudo_masks`` (scored against the masks when the training images have them; the
   CAM PNGs of the first :data:`REPORT_CAM_IMAGES` images are kept for the report);
4. the segmenter trained on the pseudo-masks with ``labelwise train``'s pipeline
   (:func:`labelwise.engine.segmenter.train_segmenter`) in ``run_dir/segmenter``;
5. when the training images come from a labeled ``data`` config, the segmenter evaluated on
   its validation split (the labels of that split are used for this score only);
6. ``self_training.rounds`` rounds (:mod:`~labelwise.methods.weak.self_training`): the latest
   segmenter labels the training images from its confident, tag-restricted predictions into
   ``run_dir/self_training/round{r}/pseudo`` and the segmenter recipe is trained again on them in
   ``round{r}/segmenter`` (each scored on the validation split like step 5).

The stage reports go to ``run_dir/weak_run.json``: ``pseudo_masks``, ``segmenter`` and
``final`` (the segmenter trained on the CAM pseudo-masks and its validation scores),
``self_training`` (per round: ``pseudo_labels``, ``segmenter``, ``final``) and ``model``, the
folder of the model the run delivers (the last round's segmenter; ``run_dir/segmenter`` without
self-training), also as ``model_subfolder`` relative to ``run_dir``: ``labelwise.load(run_dir)``
loads that segmenter. With ``resume``, finished pseudo-mask / pseudo-label folders are reused (their
report file is written last) and segmenters continue from their checkpoints.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from labelwise.config import TrainConfig, config_from_mapping, read_yaml_mapping
from labelwise.data.build import build_eval_dataset
from labelwise.engine.runtime import resolve_device
from labelwise.engine.segmenter import train_segmenter
from labelwise.inference import load, segmenter_metrics
from labelwise.io.atomic import atomic_write_json
from labelwise.io.checkpoint import has_checkpoint
from labelwise.io.jsonfile import read_json
from labelwise.io.run_lock import locks_run_folder
from labelwise.methods.weak.config import WeakConfig
from labelwise.methods.weak.data import TaggedImages
from labelwise.methods.weak.self_training import PSEUDO_FILE, self_training_labels
from labelwise.methods.weak.stages import make_pseudo_masks
from labelwise.methods.weak.train import tagged_training_images, train_classifier
from labelwise.models.artifact import artifact_kind

__all__ = ["REPORT_CAM_IMAGES", "run", "segmenter_config"]

#: CAM PNGs kept (``run_dir/pseudo_masks/cams/<image>/<class>.png``) for the first training images,
#: which ``labelwise report`` shows next to their pseudo-masks.
REPORT_CAM_IMAGES = 4


def segmenter_config(config: WeakConfig, pseudo_root: Path, run_dir: Path, self_training: bool = False
                     ) -> TrainConfig:
    """The second stage's ``TrainConfig``: the user's ``segmenter`` YAML + ``segmenter_overrides``
    (+ ``self_training.segmenter_overrides`` for a self-training round), trained on the pseudo-mask
    folder (which is also its validation split: it has no other), on this run's device;
    class-balanced loss weights unless the overrides set them."""
    pseudo = {"dataset": "folder", "root": str(pseudo_root), "train_split": "train", "val_split": "train",
              "class_map": None, "train_list": None}
    mapping = read_yaml_mapping(config.segmenter) if config.segmenter else {}
    mapping["data"] = {**(mapping.get("data") or {}), **pseudo}
    mapping["loss"] = {**(mapping.get("loss") or {}), "class_weights": "balanced"}  # unless the overrides set them
    overrides = config.segmenter_overrides + (config.self_training.segmenter_overrides if self_training else [])
    seg = config_from_mapping(TrainConfig, mapping, overrides)
    seg.data = replace(seg.data, **pseudo)  # the overrides cannot move the data off the pseudo-masks
    seg.run_dir, seg.device, seg.progress = str(run_dir), config.device, config.progress
    seg.validate()
    return seg


def tagged_items(config: WeakConfig) -> tuple[TaggedImages, Any]:
    """Every training image of ``config`` whole, with its tags (and mask when the data has
    them), for the CAM and pseudo-mask stages; and the class map."""
    dataset, class_map = tagged_training_images(config, whole=True)
    items = TaggedImages(dataset.source, dataset.num_classes, None, tags=dataset.tags,
                         min_fraction=dataset.min_fraction, ignore_index=dataset.ignore_index)
    return items, class_map


def write_stage(classifier_dir: str | Path, config: WeakConfig, out_dir: str | Path | None = None,
                pseudo: bool = True, batch_size: int = 8) -> dict[str, Any]:
    """Stages 2 (CAM PNGs) and, with ``pseudo``, 3 (pseudo-masks as a folder dataset) of a trained
    classifier over the training images of ``config``, into ``out_dir`` (default:
    ``<classifier_dir>/pseudo_masks`` or ``/cams``). Returns the stage report plus ``out``."""
    config.validate()
    items, _ = tagged_items(config)
    out = Path(out_dir) if out_dir is not None else Path(classifier_dir) / ("pseudo_masks" if pseudo else "cams")
    report = make_pseudo_masks(classifier_dir, items, out, config.cams, config.pseudo_masks, batch_size=batch_size,
                               write_cams=True, write_pseudo=pseudo, device=resolve_device(config.device))
    return {**report, "out": str(out)}


@locks_run_folder
def run(config: WeakConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """All stages (module docstring); returns the report also written to ``weak_run.json``.
    ``resume``: continue the stages that have checkpoints (a stage without one starts fresh);
    ``overwrite``: train every stage again, discarding what the run folder holds."""
    config.validate()
    run_dir = Path(config.run_dir)
    if overwrite:  # an earlier run's report would name its segmenter until this run writes its own
        (run_dir / "weak_run.json").unlink(missing_ok=True)
    report: dict[str, Any] = {}
    if overwrite or artifact_kind(run_dir) != "classifier":  # stage 1 not finished
        stage1 = train_classifier(config, resume=resume and not overwrite and has_checkpoint(run_dir),
                                  overwrite=overwrite)
        if stage1.train.steps < config.total_steps:
            return {"stopped_at": stage1.train.steps}
    items, class_map = tagged_items(config)
    device = resolve_device(config.device)
    reuse = resume and not overwrite
    masks_report = run_dir / "pseudo_masks" / "pseudo_masks.json"
    if reuse and masks_report.is_file():
        report["pseudo_masks"] = read_json(masks_report, "pseudo-mask report")
    else:
        report["pseudo_masks"] = make_pseudo_masks(run_dir, items, run_dir / "pseudo_masks", config.cams,
                                                   config.pseudo_masks, write_cams=True, device=device,
                                                   cam_limit=REPORT_CAM_IMAGES)
    seg = train_segmenter(segmenter_config(config, run_dir / "pseudo_masks" / "pseudo", run_dir / "segmenter"),
                          resume=reuse and has_checkpoint(run_dir / "segmenter"), overwrite=overwrite)
    report["segmenter"] = _segmenter_record(seg)
    val = None if config.images else build_eval_dataset(config.data)[0]
    if val is not None:
        report["final"] = _val_scores(seg.run_dir, val, config, class_map.names)
    teacher = Path(seg.run_dir)
    rounds: list[dict[str, Any]] = []
    for r in range(1, config.self_training.rounds + 1):
        round_dir = run_dir / "self_training" / f"round{r}"
        pseudo_root = round_dir / "pseudo"
        if reuse and (pseudo_root / PSEUDO_FILE).is_file():
            pseudo = read_json(pseudo_root / PSEUDO_FILE, "pseudo-label report")
        else:
            if pseudo_root.exists():
                shutil.rmtree(pseudo_root)
            pseudo = self_training_labels(teacher, items, pseudo_root, config.self_training.keep_fraction,
                                          config.pseudo_masks.background_class, device=device,
                                          precision=config.precision)
        seg = train_segmenter(segmenter_config(config, pseudo_root, round_dir / "segmenter", self_training=True),
                              resume=reuse and has_checkpoint(round_dir / "segmenter"), overwrite=overwrite)
        record: dict[str, Any] = {"round": r, "pseudo_labels": pseudo, "segmenter": _segmenter_record(seg)}
        if val is not None:
            record["final"] = _val_scores(seg.run_dir, val, config, class_map.names)
        rounds.append(record)
        teacher = Path(seg.run_dir)
    if rounds:
        report["self_training"] = rounds
    report["model"] = str(teacher)
    report["model_subfolder"] = teacher.relative_to(run_dir).as_posix()  # what loading run_dir gives
    atomic_write_json(run_dir / "weak_run.json", report)
    return report


def _segmenter_record(seg: Any) -> dict[str, Any]:
    return {"run_dir": str(seg.run_dir), "steps": seg.train.steps, "train_seconds": round(seg.train.train_seconds, 2)}


def _val_scores(model_dir: str | Path, val: Any, config: WeakConfig, names: Any) -> dict[str, Any]:
    """Metrics of the segmenter in ``model_dir`` on the validation split of ``config.data``."""
    metrics = segmenter_metrics(load(model_dir, config.device), val)
    return {"split": config.data.val_split, **metrics.to_dict(list(names))}
