"""Evaluation of an exported unsupervised model (DESIGN.md, "Evaluation protocol").

* Cluster probe: each pixel gets the centroid with the highest bilinearly upsampled cosine
  similarity of its patch codes (centroids were fitted on the *training* codes, no labels);
  the ``[C, K]`` confusion over the whole split is matched once by the Hungarian algorithm.
* Dense CRF (optional): cluster probabilities ``softmax(2 * cos)`` (STEGO's evaluation
  setting) refined by :func:`labelwise.eval.crf.crf_refine_batch`, matched on their own.
* Linear probe (optional): a 1x1 conv on the frozen codes trained with the *train* split's
  labels; a feature-quality number, never used to pick anything.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from labelwise.config import load_config
from labelwise.data.build import build_datasets, build_eval_dataset
from labelwise.engine.runtime import resolve_device
from labelwise.eval.crf import CRFParams, crf_refine_batch
from labelwise.eval.kmeans import upsample_scores
from labelwise.eval.matching import hungarian_match, matched_confusion
from labelwise.eval.metrics import ConfusionMatrix, metrics_from_confusion
from labelwise.eval.probes import linear_probe
from labelwise.features.cache import FeatureCache, extract_features, write_feature_cache
from labelwise.inference import CLUSTER_SOFTMAX_SCALE
from labelwise.methods.unsupervised.config import UnsupervisedConfig
from labelwise.methods.unsupervised.data import ResizedDataset, TileWindows
from labelwise.methods.unsupervised.model import ExportedHead, load_head

__all__ = ["CRF_ALPHA", "cluster_scores", "evaluate_clusters", "labeled_cache", "probe"]

#: Cluster scores are scaled by this before the softmax that feeds the CRF (the one value
#: every cluster model's CRF uses).
CRF_ALPHA = CLUSTER_SOFTMAX_SCALE


def cluster_scores(exported: ExportedHead, features: Tensor) -> Tensor:
    """Cosine similarities ``[B, K, h, w]`` of the codes of ``features [B, D, h, w]`` to the centroids."""
    codes = exported.codes(features)
    return torch.einsum("bchw,kc->bkhw", codes, exported.centroids.to(codes.device))


def eval_view(dataset: Dataset, config: UnsupervisedConfig) -> Dataset:
    """A labeled split as it is scored: cut into ``features.window`` windows, or resized to
    ``features.eval_size``, or as loaded."""
    if config.features.window is not None:
        class_map = getattr(dataset, "class_map", None)
        return TileWindows(dataset, config.features.window, int(getattr(class_map, "ignore_index", 255)))
    if config.features.eval_size is not None:
        return ResizedDataset(dataset, config.features.eval_size)
    return dataset


def labeled_cache(backbone: torch.nn.Module, view: Dataset, config: UnsupervisedConfig, device: torch.device
                   ) -> FeatureCache:
    """Backbone features + labels of a labeled split already viewed by :func:`eval_view`."""
    return extract_features(backbone, view, batch_size=config.features.batch_size, precision=config.precision,
                            device=device, cache_dir=config.features.cache_dir, labels=True, progress=config.progress,
                            storage=config.features.storage)


def _images_for_crf(view: Dataset, indices: range) -> list[np.ndarray]:
    images = []
    for index in indices:
        image = view[index]["image"]
        images.append(np.ascontiguousarray((image.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).byte().numpy()))
    return images


@torch.no_grad()
def evaluate_clusters(exported: ExportedHead, cache: FeatureCache, num_classes: int, *, dataset: Dataset | None = None,
                      config: UnsupervisedConfig | None = None, crf: bool = False, batch_size: int = 8,
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Cluster-probe metrics of a labeled cache (+ CRF metrics when ``crf``; then ``dataset`` is
    the viewed split the cache was extracted from (its images at label resolution) and ``config``
    gives the CRF workers and timeout).

    Returns ``{"metrics", "mapping", "confusion"}`` and, with CRF, ``"crf_metrics"``,
    ``"crf_mapping"``.
    """
    device = torch.device(device)
    k = exported.centroids.shape[0]
    plain = ConfusionMatrix(num_classes, ignore_index=cache.ignore_index, num_pred=k, device=device)
    refined = ConfusionMatrix(num_classes, ignore_index=cache.ignore_index, num_pred=k, device=device)
    crf_params = CRFParams()
    for start in range(0, len(cache), batch_size):
        stop = min(start + batch_size, len(cache))
        features = torch.from_numpy(np.asarray(cache.features[start:stop], np.float32)).to(device)
        scores = upsample_scores(cluster_scores(exported, features), cache.image_size, cache.stride)
        labels = torch.from_numpy(np.asarray(cache.labels[start:stop], np.int64)).to(device)  # type: ignore[index]
        plain.update(scores.argmax(1), labels)
        if crf:
            assert dataset is not None and config is not None
            probabilities = F.softmax(CRF_ALPHA * scores.float(), dim=1).cpu().numpy()
            images = _images_for_crf(dataset, range(start, stop))
            marginals = crf_refine_batch(images, list(probabilities), crf_params, workers=config.eval.crf_workers,
                                         timeout=config.eval.crf_timeout)
            refined.update(torch.from_numpy(np.stack([m.argmax(0) for m in marginals])).long().to(device), labels)
    out: dict[str, Any] = {}
    for name, confusion in (("", plain), ("crf_", refined)):
        if name and not crf:
            continue
        counts = confusion.matrix.cpu().numpy()
        mapping = hungarian_match(counts)
        out[name + "metrics"] = metrics_from_confusion(matched_confusion(counts, mapping))
        out[name + "mapping"] = mapping.tolist()
        out[name + "confusion"] = counts
    return out


def _code_cache(exported: ExportedHead, cache: FeatureCache, folder: Path, batch_size: int = 16) -> FeatureCache:
    codes = []
    with torch.no_grad():
        for start in range(0, len(cache), batch_size):
            features = torch.from_numpy(np.asarray(cache.features[start:start + batch_size], np.float32))
            codes.append(exported.codes(features).numpy().astype(np.float16))
    return write_feature_cache(folder, np.concatenate(codes), cache.names, labels=np.asarray(cache.labels),
                               stride=cache.stride, image_size=cache.image_size, ignore_index=cache.ignore_index,
                               num_classes=cache.num_classes, class_names=cache.class_names)


def probe(model_dir: str | Path, config: UnsupervisedConfig | None = None, *, split: str | None = None,
          crf: bool | None = None, linear: bool | None = None) -> dict[str, Any]:
    """The research protocol (DESIGN.md): probe the features of the run in ``model_dir`` on a
    labeled split of ``config.data`` (default: the run's own config and its ``data.val_split``),
    scored on the run's cached evaluation views. To score the model as a user runs it (full
    resolution, any folder), use ``labelwise.evaluate(model_dir, data, match_with=...)``.

    Returns a dict with ``miou``, ``pixel_acc``, ``mean_acc``, ``per_class_iou``, ``mapping``
    (class of each cluster), ``selection`` and, when asked, ``crf`` (the same keys after the
    CRF) and ``linear_miou`` / ``linear_pixel_acc``.
    """
    model_dir = Path(model_dir)
    exported = load_head(model_dir)
    if config is None:
        config = load_config(UnsupervisedConfig, model_dir / "config.yaml")
    crf = config.eval.crf if crf is None else crf
    linear = config.eval.linear_probe if linear is None else linear
    device = resolve_device(config.device)
    backbone = exported.backbone
    dataset, class_map = build_eval_dataset(config.data, split)
    view = eval_view(dataset, config)
    cache = labeled_cache(backbone, view, config, device)
    result = evaluate_clusters(exported, cache, class_map.num_classes, dataset=view, config=config, crf=crf,
                               device=device)
    names = list(class_map.names)
    row: dict[str, Any] = {**result["metrics"].to_dict(names), "mapping": result["mapping"],
                           "clusters": int(exported.centroids.shape[0]), "selection": exported.summary.get("selection")}
    if crf:
        row["crf"] = {**result["crf_metrics"].to_dict(names), "mapping": result["crf_mapping"]}
    if linear:
        splits = build_datasets(config.data, seed=config.seed)
        train = splits.train_source if config.features.window is not None else splits.train
        train_cache = labeled_cache(backbone, eval_view(train, config), config, device)
        with tempfile.TemporaryDirectory(prefix="labelwise-codes-") as tmp:
            probe = linear_probe(_code_cache(exported, train_cache, Path(tmp) / "train"),
                                 _code_cache(exported, cache, Path(tmp) / "val"), num_classes=class_map.num_classes,
                                 pixels_per_image=config.eval.probe_pixels_per_image)
            row["linear_miou"] = probe.metrics.miou
            row["linear_pixel_acc"] = probe.metrics.pixel_acc
    return row
