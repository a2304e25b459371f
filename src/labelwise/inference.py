"""One way to use any trained model: ``labelwise.load(folder)`` -> :class:`Predictor`.

    import labelwise
    predictor = labelwise.load("runs/camvid_unet")            # any regime's model folder
    ids = predictor.predict(images)                           # [B, 3, H, W] in [0, 1] -> [B, H, W] class ids
    predictor.class_map.names                                 # what the ids mean
    metrics = evaluate(predictor, dataset)                    # the one evaluation protocol

Every regime's folder holds a network mapping images to per-pixel scores over ``K`` outputs
(:mod:`labelwise.models.artifact`): class logits for supervised, semi-supervised and weakly
supervised segmenters, cosine scores to cluster centroids for unsupervised models. Inference is
the same for all: sliding windows with Gaussian blending for large images (``window``,
``overlap``), optional mirror averaging (``flip``) and resizing (``input_scale``), optionally a
dense CRF on the softmax of the scores. An unsupervised model predicts cluster ids until a
cluster-to-class mapping is set (:meth:`Predictor.match`, Hungarian matching on a few labeled
images, or the ``mapping`` argument); evaluation without a mapping matches on the evaluated
split itself (the cluster-probe protocol of unsupervised segmentation).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from labelwise.config import EvalConfig, from_dict
from labelwise.data.classmap import ClassMap
from labelwise.data.images import list_images
from labelwise.data.io import read_bands
from labelwise.data.preflight import check_image_file
from labelwise.engine.runtime import resolve_device
from labelwise.errors import ConfigError, DataError
from labelwise.eval.crf import CRFParams, crf_refine_batch
from labelwise.eval.evaluate import evaluate_model, make_logits_fn, predict_batch
from labelwise.eval.matching import hungarian_match, matched_confusion
from labelwise.eval.metrics import ConfusionMatrix, SegmentationMetrics, metrics_from_confusion
from labelwise.io.atomic import atomic_write_json
from labelwise.models.artifact import Artifact, load_artifact
from labelwise.report.png import write_id_png, write_prediction_pngs

__all__ = ["CLUSTER_SOFTMAX_SCALE", "MAPPING_FILE", "Predictor", "evaluate", "load", "predict_files", "segmenter_metrics"]

MAPPING_FILE = "cluster_mapping.json"

#: Cosine scores of a cluster model are multiplied by this before the softmax that feeds the CRF
#: (they lie in [-1, 1]; logits of a classifier need no scaling).
CLUSTER_SOFTMAX_SCALE = 2.0


class Predictor:
    """A loaded model folder of any regime, ready for inference.

    Attributes:
        kind: ``"segmenter"`` or ``"clusters"``.
        module: the network (eval mode) ``[B, 3, H, W] in [0, 1] -> [B, K, H, W]`` scores.
        outputs: the class map of the ``K`` score channels (cluster names for cluster models).
        mapping: ``[K]`` class id of each output channel, or ``None`` (ids are output channels).
        class_map: what the ids :meth:`predict` returns mean.
        eval_config: inference settings (window, overlap, flip, input_scale) from the folder,
            replaceable per call.
    """

    def __init__(self, artifact: Artifact, device: str | torch.device = "auto", precision: str = "bf16") -> None:
        self.artifact = artifact
        self.kind = artifact.kind
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.precision = precision
        self.module = artifact.module.to(self.device).eval()
        self.outputs = artifact.class_map
        self.eval_config = from_dict(EvalConfig, artifact.info.get("eval") or {}, prefix="model.json eval.")
        self.mapping: np.ndarray | None = None
        self._class_map = artifact.class_map

    @property
    def folder(self) -> Path:
        return self.artifact.folder

    @property
    def info(self) -> dict[str, Any]:
        return self.artifact.info

    @property
    def class_map(self) -> ClassMap:
        return self._class_map

    def set_mapping(self, mapping: Sequence[int] | np.ndarray, class_map: ClassMap) -> None:
        """Map output channel ``k`` to class ``mapping[k]`` of ``class_map`` from now on."""
        table = np.asarray(mapping, dtype=np.int64)
        if table.shape != (self.outputs.num_classes,):
            raise ConfigError(f"mapping: {self.outputs.num_classes} entries needed (one per output of "
                              f"{self.folder}), got {table.shape[0] if table.ndim else 0}")
        if table.size and (table.min() < 0 or table.max() >= class_map.num_classes):
            raise ConfigError(f"mapping: class ids must lie in [0, {class_map.num_classes})")
        self.mapping, self._class_map = table, class_map

    def options(self, **changes: Any) -> EvalConfig:
        """The folder's inference settings with ``changes`` (``None`` values keep the setting;
        ``window=0`` turns sliding windows off)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes.get("window") == 0:
            changes["window"] = None
        return replace(self.eval_config, **changes)

    @torch.no_grad()
    def scores(self, images: Tensor, options: EvalConfig | None = None) -> Tensor:
        """Float32 scores ``[B, K, H, W]`` of ``images [B, 3, H, W]`` in [0, 1]."""
        config = options or self.eval_config
        logits_fn = make_logits_fn(self.module, self.device, self.precision, config.input_scale, config.flip)
        return predict_batch(logits_fn, images.to(self.device), self.outputs.num_classes, config)

    @property
    def cosine_scores(self) -> bool:
        """Whether the outputs are cosine scores to centroids (a cluster probe), not logits (a
        segmenter, or a cluster model refined into one by ``labelwise unsupervised refine``)."""
        return self.kind == "clusters" and "segmenter" not in (self.info.get("architecture") or {})

    def probabilities(self, scores: Tensor) -> Tensor:
        """Softmax over the outputs (cosine scores scaled by :data:`CLUSTER_SOFTMAX_SCALE`, logits
        as they are)."""
        scale = CLUSTER_SOFTMAX_SCALE if self.cosine_scores else 1.0
        return F.softmax(scale * scores.float(), dim=1)

    def output_ids(self, images: Tensor, options: EvalConfig | None = None, crf: bool = False,
                   crf_workers: int | None = 0) -> Tensor:
        """Output channel ids ``[B, H, W]`` (cluster ids for an unmatched cluster model)."""
        scores = self.scores(images, options)
        if not crf:
            return scores.argmax(1)
        pictures = [np.ascontiguousarray((image.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).byte().cpu().numpy())
                    for image in images]
        marginals = crf_refine_batch(pictures, list(self.probabilities(scores).cpu().numpy()), CRFParams(),
                                     workers=crf_workers)
        return torch.from_numpy(np.stack([m.argmax(0) for m in marginals])).long().to(scores.device)

    def predict(self, images: Tensor, options: EvalConfig | None = None, crf: bool = False) -> Tensor:
        """Class ids ``[B, H, W]`` (int64) of ``images [B, 3, H, W]`` in [0, 1]; see :attr:`class_map`."""
        ids = self.output_ids(images, options, crf)
        if self.mapping is None:
            return ids
        return torch.as_tensor(self.mapping, device=ids.device)[ids]

    def match(self, dataset: Dataset, options: EvalConfig | None = None) -> np.ndarray:
        """Map outputs to the classes of a labeled ``dataset`` (Hungarian matching on the
        ``[C, K]`` pixel confusion; outputs left over go to the class they overlap most) and use
        that mapping from now on. Returns it."""
        class_map = _class_map_of(dataset)
        confusion = _confusion(self, dataset, class_map, options, crf=False, mapped=False)
        mapping = hungarian_match(confusion.cpu().numpy())
        self.set_mapping(mapping, class_map)
        return mapping


def load(path: str | Path, device: str | torch.device = "auto", precision: str = "bf16") -> Predictor:
    """Load any regime's model folder (``model.json`` + ``weights.safetensors``, or an older
    layout) for inference; see :class:`Predictor`."""
    return Predictor(load_artifact(path), device, precision)


def _class_map_of(dataset: Dataset) -> ClassMap:
    class_map = getattr(dataset, "class_map", None)
    if not isinstance(class_map, ClassMap):
        raise ConfigError(f"{type(dataset).__name__}: a labeled dataset with a class_map is needed")
    return class_map


def _confusion(predictor: Predictor, dataset: Dataset, class_map: ClassMap, options: EvalConfig | None, crf: bool,
               mapped: bool) -> Tensor:
    num_pred = class_map.num_classes if mapped else predictor.outputs.num_classes
    confusion = ConfusionMatrix(class_map.num_classes, ignore_index=class_map.ignore_index, num_pred=num_pred,
                                device=predictor.device)
    for index in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[index]
        images = sample["image"][None]
        ids = predictor.predict(images, options, crf) if mapped else predictor.output_ids(images, options, crf)
        confusion.update(ids, sample["mask"][None].to(ids.device))
    return confusion.matrix


def segmenter_metrics(predictor: Predictor, dataset: Dataset, options: EvalConfig | None = None,
                      crf: bool = False) -> SegmentationMetrics:
    """Metrics of a segmenter (or of a cluster model with a mapping) on ``dataset``, whose classes
    must be the model's. Without CRF or mapping this is :func:`~labelwise.eval.evaluate.evaluate_model`,
    the evaluation training ends with (batched); otherwise image by image."""
    class_map = _class_map_of(dataset)
    if predictor.class_map.names != class_map.names:
        raise ConfigError(f"the model at {predictor.folder} predicts classes {list(predictor.class_map.names)}, "
                          f"the dataset has {list(class_map.names)}")
    if not crf and predictor.mapping is None:
        return evaluate_model(predictor.module, dataset, class_map.num_classes, options or predictor.eval_config,
                              predictor.device, predictor.precision, class_map.ignore_index)
    return metrics_from_confusion(_confusion(predictor, dataset, class_map, options, crf, mapped=True))


def evaluate(predictor: Predictor, dataset: Dataset, options: EvalConfig | None = None, crf: bool = False
             ) -> dict[str, Any]:
    """Score ``predictor`` on every labeled pixel of ``dataset`` (whole images, one at a time).

    A segmenter (or a cluster model with a mapping) is scored as it predicts; its classes must be
    the dataset's. A cluster model without a mapping is scored under the Hungarian matching of its
    clusters to the dataset's classes on the same pixels (the cluster probe). Returns the metrics
    dict (``miou``, ``pixel_acc``, ``mean_acc``, ``per_class_iou`` ...) plus ``mapping`` for
    cluster models.
    """
    class_map = _class_map_of(dataset)
    names = list(class_map.names)
    if predictor.kind == "clusters" and predictor.mapping is None:
        counts = _confusion(predictor, dataset, class_map, options, crf, mapped=False).cpu().numpy()
        mapping = hungarian_match(counts)
        metrics: SegmentationMetrics = metrics_from_confusion(matched_confusion(counts, mapping))
        return {**metrics.to_dict(names), "mapping": mapping.tolist(), "matched_on": "evaluated split"}
    out = segmenter_metrics(predictor, dataset, options, crf).to_dict(names)
    if predictor.mapping is not None:
        out["mapping"] = predictor.mapping.tolist()
    return out


def predict_files(predictor: Predictor, inputs: Sequence[str | Path], out_dir: str | Path,
                  options: EvalConfig | None = None, crf: bool = False, alpha: float = 0.5) -> list[Path]:
    """Segment every image of ``inputs`` (files, or folders of images); write ``ids/``, ``color/``
    and ``overlay/`` PNGs per image under ``out_dir`` (and ``clusters/`` for a cluster model:
    the raw cluster ids, and ``cluster_mapping.json`` once clusters are matched to classes).
    Returns the written ``ids/`` paths."""
    out = Path(out_dir)
    if predictor.kind == "clusters" and predictor.mapping is not None:
        record = {"clusters": predictor.outputs.num_classes,
                  "mapping": {name: predictor.class_map.names[int(c)]
                              for name, c in zip(predictor.outputs.names, predictor.mapping)}}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MAPPING_FILE, record)
    paths = list_images(inputs)
    stems: dict[str, Path] = {}
    for path in paths:  # every input checked before the first output is written
        check_image_file(path)
        if path.stem in stems:
            raise DataError(f"{path}: has the same name as {stems[path.stem]}, and both would be written to "
                            f"{out}/ids/{path.stem}.png; segment them into different --out folders")
        stems[path.stem] = path
    channels = int(getattr(predictor.module, "in_channels", 3))
    written = []
    for path in paths:
        image = read_bands(path, channels)  # RGB, or e.g. the 4 bands of an RGBIR orthophoto
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255)
        ids = predictor.output_ids(tensor, options, crf)[0]
        if predictor.kind == "clusters":
            write_id_png(ids.cpu().numpy(), out / "clusters" / f"{path.stem}.png", predictor.outputs.num_classes - 1)
        labels = ids if predictor.mapping is None else torch.as_tensor(predictor.mapping, device=ids.device)[ids]
        written.append(write_prediction_pngs(labels.cpu().numpy(), image[..., :3], predictor.class_map, out, path.stem,
                                             alpha)["ids"])
    return written
