"""One pass of a model over a labeled split for the report: the confusion matrix, each image's
own mIoU, and the best and worst images with their ground truth and prediction.

A cluster model without a mapping is matched to the classes exactly as
:func:`labelwise.inference.evaluate` does (Hungarian matching on the pixel confusion of the whole
split; clusters left over go to the class they overlap most), so its confusion matrix and
panels are in class space and the mapping is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from labelwise.config import EvalConfig
from labelwise.data.classmap import ClassMap
from labelwise.eval.matching import hungarian_match, matched_confusion
from labelwise.eval.metrics import ConfusionMatrix, confusion_matrix, metrics_from_confusion
from labelwise.inference import Predictor

__all__ = ["ImagePanel", "PredictionSummary", "image_miou", "summarise_predictions"]


@dataclass
class ImagePanel:
    """One image of the grid: ``image`` uint8 ``[H, W, 3]``, ``truth`` and ``prediction`` int
    class ids ``[H, W]`` (``truth`` holds the ignore index where unlabeled), its ``miou``."""

    index: int
    name: str
    miou: float
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray


@dataclass
class PredictionSummary:
    """Outcome of :func:`summarise_predictions`: ``confusion`` ``[C, C]`` pixel counts in class
    space (rows: ground truth), the ``metrics`` dict computed from it, ``mapping`` (cluster ->
    class id, cluster models only), the ``best`` and ``worst`` images (best first / worst first),
    how many ``images`` were scored, and ``output_pixels`` (labeled pixels each output channel
    predicted, before matching: the cluster sizes of a cluster model)."""

    class_map: ClassMap
    confusion: np.ndarray
    metrics: dict[str, Any]
    mapping: list[int] | None
    output_names: list[str]
    best: list[ImagePanel]
    worst: list[ImagePanel]
    images: int
    output_pixels: list[int] | None = None


def image_miou(prediction: np.ndarray, truth: np.ndarray, num_classes: int, ignore_index: int) -> float:
    """Mean IoU of one image over the classes present in its labeled pixels or predicted there
    (NaN when it has no labeled pixel): the split-level metric of :mod:`labelwise.eval.metrics`
    on one image's confusion matrix."""
    counts = confusion_matrix(torch.from_numpy(prediction.astype(np.int64)), torch.from_numpy(truth.astype(np.int64)),
                              num_classes, ignore_index)
    return float(metrics_from_confusion(counts).miou)


@torch.no_grad()
def summarise_predictions(predictor: Predictor, dataset: Dataset, count: int = 3, options: EvalConfig | None = None,
                          limit: int | None = None) -> PredictionSummary:
    """Predict every image of the labeled ``dataset`` (the first ``limit`` when given) whole, one
    at a time, with the model's own evaluation settings (or ``options``); see the module
    docstring. ``count``: how many best and worst images to keep."""
    class_map = getattr(dataset, "class_map", None)
    if not isinstance(class_map, ClassMap):
        raise ValueError(f"{type(dataset).__name__}: a labeled dataset with a class_map is needed")
    total = len(dataset) if limit is None else min(limit, len(dataset))  # type: ignore[arg-type]
    clusters = predictor.kind == "clusters" and predictor.mapping is None
    k = predictor.outputs.num_classes if clusters else class_map.num_classes
    if not clusters and predictor.class_map.names != class_map.names:
        raise ValueError(f"the model at {predictor.folder} predicts classes {list(predictor.class_map.names)}, "
                         f"the dataset has {list(class_map.names)}")
    raw = ConfusionMatrix(class_map.num_classes, ignore_index=class_map.ignore_index, num_pred=k)
    outputs: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    names: list[str] = []
    for index in range(total):
        sample = dataset[index]
        ids = (predictor.output_ids if clusters else predictor.predict)(sample["image"][None].float(), options)[0]
        ids = ids.cpu()
        mask = torch.as_tensor(sample["mask"]).long()
        raw.update(ids[None], mask[None])
        outputs.append(ids.numpy().astype(np.int16))  # int16: a whole split of large tiles stays small
        truths.append(mask.numpy().astype(np.int16))
        names.append(str(sample.get("name", index)))
    counts = raw.matrix.cpu().numpy()
    output_pixels = [int(v) for v in counts.sum(axis=0)]
    mapping = None
    if clusters:
        table = hungarian_match(counts)
        mapping = [int(c) for c in table]
        counts = matched_confusion(counts, table)
        outputs = [table[ids].astype(np.int16) for ids in outputs]
    metrics = metrics_from_confusion(counts).to_dict(list(class_map.names))
    scores = [image_miou(pred, truth, class_map.num_classes, class_map.ignore_index)
              for pred, truth in zip(outputs, truths)]
    order = [i for i in np.argsort(-np.nan_to_num(np.asarray(scores), nan=-1.0), kind="stable") if
             not np.isnan(scores[i])]
    count = max(0, min(count, len(order) // 2 if len(order) > 1 else len(order)))

    def panel(i: int) -> ImagePanel:
        image = dataset[int(i)]["image"].float()[:3]  # the colour bands (an RGBIR tile shows its RGB)
        rgb = (image.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
        return ImagePanel(int(i), names[i], float(scores[i]), rgb, truths[i], outputs[i])

    best = [panel(i) for i in order[:count]]
    worst = [panel(i) for i in reversed(order[len(order) - count:])] if count else []
    return PredictionSummary(class_map, np.asarray(counts), metrics, mapping, list(predictor.outputs.names), best,
                             worst, total, output_pixels)
