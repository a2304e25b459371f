"""Self-training refinement of an unsupervised run (``labelwise unsupervised refine RUN``).

An unsupervised run predicts clusters from patch features: one decision per 8-16 pixel patch,
bilinearly upsampled, so its boundaries are blurry and thin structures vanish. Refinement
(the self-training step of U2Seg and of STEGO's / HP's "+ refinement" rows, here with a
segmenter instead of a CRF alone) trains an ordinary segmentation network on the run's own
cluster predictions:

1. the teacher (the run for round 1, the previous round's model afterwards) predicts every
   training image of the run at its own size (sliding windows with the teacher's evaluation
   settings), optionally refined by a dense CRF (``crf``);
2. per image and per predicted cluster, only the most confident ``keep_fraction`` of that
   cluster's pixels is kept (confidence: top-1 minus top-2 score, or CRF marginal, margin; a
   per-cluster rank, so every cluster keeps pixels even where its scores are low overall;
   :func:`labelwise.data.pseudo_labels.select_confident`, shared with ``weak run``'s self-training);
   every other pixel is ignored (255). The pseudo-labels are written as a labelwise folder
   dataset ``out/round{r}/pseudo/train/{images,labels}/*.png`` + ``classes.json``
   (``cluster_0 ... cluster_{K-1}``);
3. a segmenter (default :data:`DEFAULT_SEGMENTER`: U-Net on the ImageNet MobileNetV2 encoder)
   is trained on that folder with ``labelwise train``'s pipeline
   (:func:`labelwise.engine.segmenter.train_segmenter`) into ``out/round{r}/segmenter``; its
   validation split is the same folder (there is no other: no label is read);
4. ``out/round{r}`` becomes a ``clusters`` model folder holding that segmenter
   (``architecture = {"segmenter": ...}``): ``labelwise.load`` predicts cluster ids with it and
   :func:`labelwise.inference.evaluate` scores it under Hungarian matching, like the run itself.

Why it helps: the segmenter sees pixels, not patches, so it learns the clusters' appearance and
puts their boundaries where the image's edges are; dropping the least confident pixels of each
cluster (mostly those near boundaries, where the patch prediction is mixed) keeps the labels it
learns from cleaner than the teacher's full prediction. Everything stays label-free: clusters
are never matched to classes while refining. When the training images have masks, they only
score the pseudo-labels (``pseudo_label_miou``, Hungarian-matched, on the kept pixels;
``teacher_miou`` on all pixels), a diagnostic written to ``refine.json``.

Crash safety and resume: every file is written atomically, a round's ``model.json`` last; a
round whose ``model.json`` exists is never redone (unless ``overwrite``); with ``resume`` an
unfinished round reuses its complete pseudo-labels and continues the segmenter from its
checkpoints.

    from labelwise.config import load_config
    from labelwise.methods.unsupervised.refine import RefineConfig, refine

    result = refine("runs/unsupervised_synthetic", load_config(RefineConfig, None, ["rounds=2"]))
    labelwise.load(result.final_model)            # cluster ids; evaluate() matches them to classes
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from labelwise.config import TrainConfig, config_from_mapping, load_config, read_yaml_mapping, to_dict
from labelwise.data.classmap import ClassMap
from labelwise.data.identity import dataset_names
from labelwise.data.pseudo_labels import (
    IGNORE_INDEX,
    content_mask,
    file_stems,
    margin_confidence,
    select_confident,
    write_pseudo_label,
)
from labelwise.engine.runtime import resolve_device, seed_everything
from labelwise.engine.segmenter import train_segmenter
from labelwise.errors import CheckpointError, ConfigError
from labelwise.eval.crf import CRFParams, crf_refine_batch
from labelwise.eval.matching import hungarian_match, matched_confusion
from labelwise.eval.metrics import ConfusionMatrix, metrics_from_confusion
from labelwise.inference import load
from labelwise.io.atomic import atomic_path, atomic_write_json
from labelwise.io.checkpoint import has_checkpoint
from labelwise.io.jsonfile import read_json
from labelwise.io.run_lock import run_folder_lock
from labelwise.methods.unsupervised.config import UnsupervisedConfig
from labelwise.methods.unsupervised.train import SELECTION_RULE, training_source
from labelwise.models.artifact import (
    INFO_FILE,
    WEIGHTS_FILE,
    artifact_kind,
    cluster_class_map,
    provenance,
    write_artifact_info,
)

__all__ = ["DEFAULT_SEGMENTER", "IGNORE_INDEX", "REFINE_FILE", "RefineConfig", "RefineResult", "margin_confidence",
           "pseudo_label_images", "refine", "segmenter_config", "select_confident"]

#: The summary of a refinement, in its output folder.
REFINE_FILE = "refine.json"
#: A round's record, written just before its ``model.json``.
ROUND_FILE = "refine_round.json"
#: Written last into ``pseudo/``: the pseudo-labels of the round are complete.
PSEUDO_FILE = "pseudo_labels.json"

#: The segmenter recipe used when ``RefineConfig.segmenter`` is None (a ``labelwise train``
#: config; ``configs/refine_segmenter.yaml`` holds the same): U-Net on the ImageNet MobileNetV2
#: encoder (``../shared/weights/mobilenet_v2_imagenet.pth``), the encoder at a tenth of the
#: decoder's learning rate, class-balanced cross-entropy over the clusters, one stage of 1,000
#: steps of 8 crops of 256 x 256 pixels at full resolution (out-of-image pixels ignored) with
#: flips, zoom and color jitter: about 3x faster than whole 360 x 480 images, at the scale
#: prediction sees. Sliding windows of 1,024 pixels for large images.
DEFAULT_SEGMENTER: dict[str, Any] = {
    "model": {"name": "unet", "options": {"encoder": "mobilenet_v2", "encoder_weights": "imagenet", "dropout": 0.1},
              "encoder_lr_scale": 0.1},
    "loss": {"terms": [{"name": "ce", "weight": 1.0}], "class_weights": "balanced", "balance_method": "inverse_sqrt"},
    "optim": {"name": "adamw", "weight_decay": 0.0001, "grad_clip": 5.0},
    "stages": [{"steps": 1000, "lr": 0.002, "schedule": "poly", "warmup_steps": 50,
                "augment": {"hflip": 0.5, "scale": [0.75, 1.5], "crop_size": [256, 256], "brightness": 0.2,
                            "contrast": 0.2, "saturation": 0.2}}],
    "data": {"batch_size": 8},
    "eval": {"window": 1024, "batch_size": 4},
    "checkpoint_every": 250,
    "log_every": 25,
}


@dataclass
class RefineConfig:
    """Settings of :func:`refine` (``load_config(RefineConfig, yaml_or_None, overrides)``).

    ``rounds``: self-training rounds (each teaches the next). ``crf``: dense CRF on the
    teacher's probabilities before the pseudo-labels are taken. ``keep_fraction`` in (0, 1]:
    per image and per cluster, the share of that cluster's pixels kept (the most confident;
    the rest is ignored). ``segmenter``: a ``labelwise train`` YAML (default:
    :data:`DEFAULT_SEGMENTER`); its ``data`` section is replaced by the pseudo-label folder.
    ``segmenter_overrides``: ``KEY=VALUE`` overrides of it (``stages.0.lr=0.001``,
    ``model.options.encoder_weights=null`` for a randomly initialised encoder). ``steps``:
    replaces the segmenter's (single) stage's ``steps`` (its warm-up is cut to a tenth of them
    when longer). ``out_dir``: default ``<run>/refine``. ``device``, ``precision``, ``seed``,
    ``progress``: for pseudo-labelling and the segmenter's training.
    """

    rounds: int = 1
    crf: bool = False
    keep_fraction: float = 0.5
    segmenter: str | None = None
    segmenter_overrides: list[str] = field(default_factory=list)
    steps: int | None = None
    out_dir: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Range checks (errors name the key)."""
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"keep_fraction: must be in (0, 1], got {self.keep_fraction}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps: must be >= 1 or null, got {self.steps}")
        for index, item in enumerate(self.segmenter_overrides):
            if "=" not in item:
                raise ConfigError(f"segmenter_overrides.{index}: expected KEY=VALUE, got {item!r}")


@dataclass
class RefineResult:
    """Outcome of :func:`refine`: the output folder, the final model folder (the last round's,
    a ``clusters`` artifact) and the summary written to ``out_dir/refine.json``."""

    out_dir: Path
    final_model: Path
    summary: dict[str, Any]


# ----------------------------------------------------------------------------- pseudo-labels


def _matched_miou(confusion: ConfusionMatrix, class_map: ClassMap) -> float | None:
    counts = confusion.matrix.cpu().numpy()
    if counts.sum() == 0:
        return None
    metrics = metrics_from_confusion(matched_confusion(counts, hungarian_match(counts)))
    value = float(metrics.miou)
    return None if math.isnan(value) else round(value, 6)


@torch.no_grad()
def pseudo_label_images(teacher: str | Path, source: Dataset, out_root: str | Path, keep_fraction: float,
                        crf: bool = False, device: str | torch.device = "cpu", precision: str = "bf16",
                        progress: bool = False) -> dict[str, Any]:
    """Pseudo-label every image of ``source`` with the cluster model ``teacher`` and write them as
    a folder dataset ``out_root/train/{images,labels}/<name>.png`` + ``out_root/classes.json``.

    Each image is predicted whole at its own size (sliding windows per the teacher's evaluation
    settings); ids are the argmax of the scores (of the CRF marginals with ``crf``), kept by
    :func:`select_confident` with the top-1 minus top-2 margin of the same scores / marginals.
    Masks of ``source`` (when it has them) only score the result. Returns the report also
    written (last) to ``out_root/pseudo_labels.json``: ``images``, ``pixels`` (image pixels),
    ``kept_fraction`` (their share labeled), ``cluster_pixels`` (kept pixels per cluster),
    ``seconds``, and with masks ``pseudo_label_miou`` (kept pixels) and ``teacher_miou`` (every
    pixel), both under Hungarian matching of clusters to classes.
    """
    start = time.perf_counter()
    out = Path(out_root)
    predictor = load(teacher, device=device, precision=precision)
    k = predictor.outputs.num_classes
    if k >= IGNORE_INDEX:
        raise ConfigError(f"{teacher}: {k} clusters; pseudo-label PNGs hold at most {IGNORE_INDEX - 1} "
                          f"(value {IGNORE_INDEX} is ignore)")
    names = file_stems(dataset_names(source))
    class_map = getattr(source, "class_map", None)
    scored = isinstance(class_map, ClassMap)
    kept_matrix = all_matrix = None
    if scored:
        kept_matrix = ConfusionMatrix(class_map.num_classes, ignore_index=class_map.ignore_index, num_pred=k)
        all_matrix = ConfusionMatrix(class_map.num_classes, ignore_index=class_map.ignore_index, num_pred=k)
    pixels = kept = 0
    cluster_pixels = torch.zeros(k, dtype=torch.long)
    crf_params = CRFParams()
    total = len(source)  # type: ignore[arg-type]
    for index in range(total):
        sample = source[index]
        image = sample["image"].float()
        scores = predictor.scores(image[None])  # [1, K, H, W]
        if crf:
            picture = np.ascontiguousarray((image.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).byte().numpy())
            marginals = crf_refine_batch([picture], [predictor.probabilities(scores)[0].cpu().numpy()], crf_params,
                                         workers=0)[0]
            scores = torch.from_numpy(marginals)[None]
        ids, margin = margin_confidence(scores)
        valid = content_mask(source, index, tuple(ids.shape[-2:]))
        labels = select_confident(ids, margin, keep_fraction, k,
                                  None if valid is None else valid[None].to(ids.device))[0].cpu()
        ids = ids[0].cpu()
        count = int(valid.sum()) if valid is not None else labels.numel()
        pixels += count
        chosen = labels != IGNORE_INDEX
        kept += int(chosen.sum())
        cluster_pixels += torch.bincount(labels[chosen], minlength=k)
        mask = sample.get("mask")
        if scored and mask is not None:
            target = mask.long()
            if valid is not None:
                target = target.masked_fill(~valid, class_map.ignore_index)
            all_matrix.update(ids, target)
            kept_matrix.update(labels.masked_fill(~chosen, 0), target.masked_fill(~chosen, class_map.ignore_index))
        write_pseudo_label(image, labels, out, names[index])
        if progress and (index + 1 == total or (index + 1) % 50 == 0):
            print(f"pseudo-labels {index + 1}/{total}", flush=True)
    classes = cluster_class_map(k)
    atomic_write_json(out / "classes.json", {**classes.to_dict(), "ignore_index": IGNORE_INDEX})
    report: dict[str, Any] = {"teacher": str(teacher), "images": total, "pixels": pixels,
                              "kept_fraction": round(kept / max(1, pixels), 6), "keep_fraction": keep_fraction,
                              "crf": crf, "cluster_pixels": cluster_pixels.tolist()}
    if scored and all_matrix is not None and kept_matrix is not None:
        report["pseudo_label_miou"] = _matched_miou(kept_matrix, class_map)
        report["teacher_miou"] = _matched_miou(all_matrix, class_map)
    report["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(out / PSEUDO_FILE, report)
    return report


# ----------------------------------------------------------------------------- the segmenter


def _check_encoder_weights(seg: TrainConfig) -> None:
    """Fail now, with what to do, when the segmenter's pretrained encoder weights are missing."""
    from labelwise.models.pretrained import weights_path

    options = seg.model.options
    encoder = options.get("encoder")
    weights = options.get("encoder_weights", "imagenet")
    if not encoder or weights is None:
        return
    try:
        weights_path(str(encoder), str(weights))
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}. The refinement segmenter starts from these {encoder} weights (model.options.encoder_weights="
            f"{weights}); to train it from a randomly initialised encoder instead, add the segmenter override "
            f"model.options.encoder_weights=null (CLI: --set segmenter_overrides.0=model.options.encoder_weights=null; "
            f"YAML: segmenter_overrides: [model.options.encoder_weights=null])") from exc


def segmenter_config(config: RefineConfig, pseudo_root: str | Path, run_dir: str | Path) -> TrainConfig:
    """The segmenter's ``TrainConfig`` of a round: ``config.segmenter`` (or :data:`DEFAULT_SEGMENTER`)
    + ``segmenter_overrides`` + ``steps``, trained on the pseudo-label folder ``pseudo_root``
    (also its validation split), into ``run_dir``, on this refinement's device, precision, seed.
    Checks that the encoder's pretrained weights can be found."""
    pseudo = {"dataset": "folder", "root": str(pseudo_root), "train_split": "train", "val_split": "train",
              "class_map": None, "train_list": None}
    mapping = read_yaml_mapping(config.segmenter) if config.segmenter else copy.deepcopy(DEFAULT_SEGMENTER)
    mapping["data"] = {**(mapping.get("data") or {}), **pseudo}
    where = f"segmenter ({config.segmenter or 'the built-in recipe'}) with segmenter_overrides"
    try:
        seg = config_from_mapping(TrainConfig, mapping, config.segmenter_overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if config.steps is not None:
        if len(seg.stages) != 1:
            raise ConfigError(f"steps: the segmenter trains in {len(seg.stages)} stages; set each one's steps with "
                              f"segmenter_overrides (stages.0.steps=...)")
        stage = seg.stages[0]
        seg.stages = [replace(stage, steps=config.steps, warmup_steps=min(stage.warmup_steps, config.steps // 10)
                              if stage.warmup_steps >= config.steps else stage.warmup_steps)]
    seg.data = replace(seg.data, **pseudo)  # the overrides cannot move the data off the pseudo-labels
    seg.run_dir, seg.device, seg.precision = str(run_dir), config.device, config.precision
    seg.seed, seg.progress = config.seed, config.progress
    try:
        seg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    _check_encoder_weights(seg)
    return seg


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source`` (a hard link when the file system allows), atomically."""
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def _write_round_model(round_dir: Path, segmenter_dir: Path, record: dict[str, Any], source_info: dict[str, Any],
                       round_report: dict[str, Any]) -> None:
    """Make ``round_dir`` a ``clusters`` model folder holding the segmenter of ``segmenter_dir``:
    weights first, the round report, ``model.json`` last."""
    info = read_json(segmenter_dir / INFO_FILE, "model description")
    clusters = len(info["class_map"]["classes"])
    _link_or_copy(segmenter_dir / WEIGHTS_FILE, round_dir / WEIGHTS_FILE)
    atomic_write_json(round_dir / ROUND_FILE, round_report)
    data = (source_info.get("training") or {}).get("data")
    write_artifact_info(round_dir, "clusters", {"segmenter": info["architecture"]}, cluster_class_map(clusters),
                        preprocessing=info.get("preprocessing"), source=info.get("source"),
                        eval_config=info.get("eval"), training=provenance(data),
                        extra={"unsupervised": record})


# ----------------------------------------------------------------------------- rounds


def _source_run(run_dir: Path) -> tuple[dict[str, Any], UnsupervisedConfig]:
    """``(model.json, config)`` of the unsupervised run to refine; errors name what is missing."""
    kind = artifact_kind(run_dir)
    if kind != "clusters":
        raise ConfigError(f"{run_dir}: not an unsupervised run folder (model kind {kind!r}); refine the folder of "
                          f"`labelwise unsupervised train`")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir / 'config.yaml'}: missing; refinement reads the run's training images from "
                          f"its config (refine the run folder of `labelwise unsupervised train`, not a copy of "
                          f"its model files)")
    info = read_json(run_dir / INFO_FILE, "model description")
    return info, load_config(UnsupervisedConfig, run_dir / "config.yaml")


def _check_finished_round(round_dir: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The record of a finished round, after checking that it was made with these settings."""
    info = read_json(round_dir / INFO_FILE, "model description")
    made = ((info.get("unsupervised") or {}).get("refine") or {})
    for key in ("keep_fraction", "crf", "source_run", "teacher"):
        same = made.get(key) == expected[key]
        if key in ("source_run", "teacher") and isinstance(made.get(key), str):
            same = Path(made[key]).resolve() == Path(expected[key]).resolve()
        if not same:
            raise ConfigError(f"{key}: {round_dir} was made with {key} {made.get(key)!r}, this refinement asks for "
                              f"{expected[key]!r}; pass --overwrite to redo the rounds or choose another --out")
    path = round_dir / ROUND_FILE
    return read_json(path, "round record") if path.is_file() else {"round": made.get("round"), "model": str(round_dir)}


def _clear_round(round_dir: Path) -> None:
    """Remove a round folder, ``model.json`` first (so a crash never leaves a "finished" round)."""
    (round_dir / INFO_FILE).unlink(missing_ok=True)
    if round_dir.exists():
        shutil.rmtree(round_dir)


def refine(run_dir: str | Path, config: RefineConfig | None = None, *, resume: bool = False,
           overwrite: bool = False) -> RefineResult:
    """Self-train a segmenter on the cluster predictions of the unsupervised run ``run_dir`` for
    ``config.rounds`` rounds (module docstring). ``resume``: continue an unfinished round from its
    pseudo-labels and segmenter checkpoints; ``overwrite``: redo every round. Returns the final
    model folder and the summary also written to ``out_dir/refine.json``.

    Raises:
        ConfigError: a bad setting, a folder that is not an unsupervised run, or finished rounds
            made with other settings.
        CheckpointError: an unfinished round without ``resume`` / ``overwrite``, or missing
            pretrained encoder weights (with how to train from a random encoder).
    """
    config = config or RefineConfig()
    config.validate()
    run = Path(run_dir)
    source_info, run_config = _source_run(run)
    out = Path(config.out_dir) if config.out_dir else run / "refine"
    with run_folder_lock(out):  # one refinement at a time writes into out
        segmenter_config(config, out / "round1" / "pseudo", out / "round1" / "segmenter")  # fail early on bad settings
        seed_everything(config.seed)
        device = resolve_device(config.device)
        source: Dataset | None = None
        source_record = dict(source_info.get("unsupervised") or {})
        rounds: list[dict[str, Any]] = []
        for r in range(1, config.rounds + 1):
            round_dir = out / f"round{r}"
            teacher = run if r == 1 else out / f"round{r - 1}"
            refine_record = {"round": r, "rounds": config.rounds, "keep_fraction": config.keep_fraction,
                             "crf": config.crf, "teacher": str(teacher), "source_run": str(run)}
            if overwrite:
                _clear_round(round_dir)
            elif (round_dir / INFO_FILE).is_file():
                rounds.append(_check_finished_round(round_dir, refine_record))
                continue
            elif round_dir.exists() and any(round_dir.iterdir()) and not resume:
                raise CheckpointError(f"{round_dir}: an unfinished round of an earlier refinement; pass --resume to "
                                      f"continue it, --overwrite to redo the rounds, or choose another --out")
            pseudo_root = round_dir / "pseudo"
            if resume and (pseudo_root / PSEUDO_FILE).is_file():
                pseudo = read_json(pseudo_root / PSEUDO_FILE, "pseudo-label report")
            else:
                if pseudo_root.exists():
                    shutil.rmtree(pseudo_root)
                if source is None:
                    source = training_source(run_config)
                pseudo = pseudo_label_images(teacher, source, pseudo_root, config.keep_fraction, config.crf, device,
                                             config.precision, config.progress)
            segmenter_dir = round_dir / "segmenter"
            seg_config = segmenter_config(config, pseudo_root, segmenter_dir)
            seg = train_segmenter(seg_config, resume=resume and has_checkpoint(segmenter_dir))
            report = {"round": r, "teacher": str(teacher), "model": str(round_dir),
                      "pseudo_labels": {key: pseudo.get(key) for key in ("images", "pixels", "kept_fraction",
                                                                         "pseudo_label_miou", "teacher_miou", "seconds")
                                        if key in pseudo},
                      "segmenter": {"run_dir": str(segmenter_dir), "steps": seg.train.steps,
                                    "train_seconds": round(seg.train.train_seconds, 2)}}
            record = {**source_record, "selection": SELECTION_RULE, "refine": refine_record}
            _write_round_model(round_dir, segmenter_dir, record, source_info, report)
            rounds.append(report)
        final = out / f"round{config.rounds}"
        last = rounds[-1].get("pseudo_labels") or {}
        summary: dict[str, Any] = {
            "source_run": str(run), "out_dir": str(out), "final_model": str(final), "rounds": config.rounds,
            "keep_fraction": config.keep_fraction, "crf": config.crf, "selection": SELECTION_RULE,
            "pseudo_label_kept_fraction": last.get("kept_fraction"),
            "train_seconds": round(sum((r_.get("segmenter") or {}).get("train_seconds") or 0.0
                                       for r_ in rounds), 2),
            "pseudo_label_seconds": round(sum((r_.get("pseudo_labels") or {}).get("seconds") or 0.0
                                              for r_ in rounds), 2),
            "per_round": rounds, "config": to_dict(config),
        }
        if last.get("pseudo_label_miou") is not None:
            summary["pseudo_label_miou"] = last["pseudo_label_miou"]
        atomic_write_json(out / REFINE_FILE, summary)
        return RefineResult(out, final, summary)
