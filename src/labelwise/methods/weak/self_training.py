"""Self-training rounds of ``weak run``: the segmenter relabels its own training images.

The segmenter trained on CAM pseudo-masks already puts boundaries where the image's edges are and
fills objects the CAMs covered only in part; its own confident predictions are a cleaner
training signal than the CAMs were. One round (:func:`self_training_labels`, then the same
segmenter recipe trained from its initial weights on the new labels):

1. the teacher (the segmenter of the previous round; round 1: the one trained on the CAM
   pseudo-masks) predicts every training image whole (sliding windows per its evaluation
   settings), its scores restricted to the image's tags (and the background class, when the
   dataset has one): a class the tags rule out is never predicted
   (:func:`labelwise.data.pseudo_labels.restrict_scores`);
2. per image and per predicted class, the most confident ``keep_fraction`` of that class's
   pixels keep it (top-1 minus top-2 logit margin among the allowed classes;
   :func:`labelwise.data.pseudo_labels.select_confident`, the rule ``unsupervised refine``
   uses); the others are ignored (255);
3. the labels are written as a folder dataset ``round{r}/pseudo`` and the ``segmenter`` recipe
   (with ``segmenter_overrides``, then ``self_training.segmenter_overrides``) is trained on it
   into ``round{r}/segmenter``.

No pixel label is read: when the training images have masks they only score the result
(``pseudo_labels``: the kept pixels; ``teacher_scores``: every pixel, both with the tag
restriction).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from labelwise.data.classmap import ClassMap
from labelwise.data.identity import dataset_names
from labelwise.data.pseudo_labels import (
    IGNORE_INDEX,
    content_mask,
    file_stems,
    margin_confidence,
    restrict_scores,
    select_confident,
    write_pseudo_label,
)
from labelwise.errors import ConfigError
from labelwise.eval.metrics import ConfusionMatrix
from labelwise.inference import load
from labelwise.io.atomic import atomic_write_json
from labelwise.methods.weak.data import TaggedImages
from labelwise.methods.weak.stages import same_size_batches

__all__ = ["PSEUDO_FILE", "self_training_labels"]

#: Written last into a round's ``pseudo/``: its pseudo-labels are complete.
PSEUDO_FILE = "pseudo_labels.json"


def _metrics(matrix: ConfusionMatrix, class_map: ClassMap) -> dict[str, Any]:
    scores = matrix.compute().to_dict(class_map.names)
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in scores.items()}


@torch.no_grad()
def self_training_labels(teacher: str | Path, items: TaggedImages, out_root: str | Path, keep_fraction: float,
                         background_class: int | None = None, batch_size: int = 4,
                         device: str | torch.device = "cpu", precision: str = "bf16") -> dict[str, Any]:
    """Steps 1-2 of a round (module docstring): the segmenter ``teacher`` labels every item of
    ``items`` (whole images with their ``tags`` [K]; consecutive same-size images in batches of
    ``batch_size``) into the folder dataset ``out_root`` (``train/{images,labels}/<name>.png``,
    ``classes.json``). Returns the report also written, last, to ``out_root/pseudo_labels.json``:
    ``images``, ``pixels``, ``kept_fraction``, ``seconds`` and, when the items have masks,
    ``pseudo_labels`` (metrics of the kept pixels) and ``teacher_scores`` (of every pixel)."""
    start = time.perf_counter()
    out = Path(out_root)
    predictor = load(teacher, device=device, precision=precision)
    class_map = predictor.class_map
    k = class_map.num_classes
    if k >= IGNORE_INDEX:
        raise ConfigError(f"{teacher}: {k} classes; pseudo-label PNGs hold at most {IGNORE_INDEX - 1}")
    if items.num_classes != k:
        raise ConfigError(f"{teacher}: the segmenter predicts {k} classes, the tags name {items.num_classes}")
    scored_map = ClassMap.from_names(list(class_map.names), ignore_index=items.ignore_index)
    kept_matrix = ConfusionMatrix(k, items.ignore_index)
    all_matrix = ConfusionMatrix(k, items.ignore_index)
    stems = file_stems(dataset_names(items.source))
    pixels = kept = labeled = index = 0
    for batch in same_size_batches((items[i] for i in range(len(items))), batch_size):
        images = torch.stack([item["image"].float() for item in batch])
        allowed = torch.stack([torch.as_tensor(item["tags"]) for item in batch]).bool()
        if background_class is not None:
            allowed[:, background_class] = True
        scores = restrict_scores(predictor.scores(images), allowed)
        ids, margin = margin_confidence(scores)
        masks = [content_mask(items.source, index + j, tuple(ids.shape[-2:])) for j in range(len(batch))]
        valid = None
        if any(mask is not None for mask in masks):
            valid = torch.stack([torch.ones(ids.shape[-2:], dtype=torch.bool) if mask is None else mask
                                 for mask in masks]).to(ids.device)
        labels = select_confident(ids, margin, keep_fraction, k, valid).cpu()
        ids = ids.cpu()
        chosen = labels != IGNORE_INDEX
        pixels += int(valid.sum()) if valid is not None else labels.numel()
        kept += int(chosen.sum())
        if all("mask" in item for item in batch):
            target = torch.stack([torch.as_tensor(item["mask"]).long() for item in batch])
            if valid is not None:
                target = target.masked_fill(~valid.cpu(), items.ignore_index)
            labeled += int((target != items.ignore_index).sum())
            all_matrix.update(ids, target)
            kept_matrix.update(labels.masked_fill(~chosen, 0), target.masked_fill(~chosen, items.ignore_index))
        for j, item in enumerate(batch):
            write_pseudo_label(item["image"], labels[j], out, stems[index + j])
        index += len(batch)
    atomic_write_json(out / "classes.json", {"classes": list(class_map.names), "ignore_index": IGNORE_INDEX})
    report: dict[str, Any] = {"teacher": str(teacher), "images": index, "pixels": pixels,
                              "kept_fraction": round(kept / max(1, pixels), 6), "keep_fraction": keep_fraction}
    if labeled:
        report["pseudo_labels"] = _metrics(kept_matrix, scored_map)
        report["teacher_scores"] = _metrics(all_matrix, scored_map)
    report["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_json(out / PSEUDO_FILE, report)
    return report

