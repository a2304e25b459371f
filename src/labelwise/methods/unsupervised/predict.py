"""Segment the user's own images with an exported unsupervised model.

``predict(model_dir, inputs, out_dir)`` writes, per image, ``clusters/<stem>.png`` (8-bit cluster
ids), and ``ids/``, ``color/``, ``overlay/`` PNGs (:func:`labelwise.report.png.write_prediction_pngs`).
Without ``match_with`` the ids are cluster ids shown in a fixed palette. With ``match_with`` (a
folder of a few labelled images: ``images/`` + ``labels/`` and a ``classes.json`` class map, the
layout :class:`labelwise.data.folder.FolderDataset` reads), the clusters are first mapped to
classes by Hungarian matching of the clusters of those images to their labels
(:func:`match_clusters`); ``ids/`` then holds class ids, ``color/`` the class colours, and
``cluster_mapping.json`` records the mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from labelwise.data.classmap import ClassMap, default_palette
from labelwise.data.folder import FolderDataset
from labelwise.data.images import list_images
from labelwise.data.io import read_image
from labelwise.engine.runtime import autocast, resolve_device
from labelwise.eval.kmeans import upsample_scores
from labelwise.eval.matching import hungarian_match
from labelwise.eval.metrics import ConfusionMatrix
from labelwise.features.attention import patch_tokens
from labelwise.io.atomic import atomic_write_json
from labelwise.methods.unsupervised.data import window_starts
from labelwise.methods.unsupervised.evaluate import cluster_scores
from labelwise.methods.unsupervised.model import ExportedHead, load_head
from labelwise.report.png import write_id_png, write_prediction_pngs

__all__ = ["MAPPING_FILE", "cluster_map", "match_clusters", "predict", "predict_clusters"]

MAPPING_FILE = "cluster_mapping.json"
DEFAULT_WINDOW = 1024


@torch.no_grad()
def predict_clusters(exported: ExportedHead, backbone: torch.nn.Module, image: Tensor, device: torch.device,
                     precision: str = "bf16", window: int | None = None) -> Tensor:
    """Cluster id ``[H, W]`` (int64) of every pixel of ``image [3, H, W]`` in [0, 1].

    Images with a side above ``window`` are processed window by window (the grid of
    :func:`~labelwise.methods.unsupervised.data.window_starts`, each pixel taken from the first
    window covering it), so a large aerial tile never goes through the ViT whole.
    """
    height, width = image.shape[-2:]
    if window is None or (height <= window and width <= window):
        return _window_clusters(exported, backbone, image, device, precision)
    out = torch.empty(height, width, dtype=torch.long)
    for y, y_from, y_to in window_starts(height, window):
        for x, x_from, x_to in window_starts(width, window):
            clusters = _window_clusters(exported, backbone, image[:, y:y + window, x:x + window], device, precision)
            out[y_from:y_to, x_from:x_to] = clusters[y_from - y:y_to - y, x_from - x:x_to - x]
    return out


def _window_clusters(exported: ExportedHead, backbone: torch.nn.Module, image: Tensor, device: torch.device,
                     precision: str) -> Tensor:
    height, width = image.shape[-2:]
    with autocast(device, precision):
        features = patch_tokens(backbone(image[None].to(device))).float()
    scores = cluster_scores(exported, features)
    stride = getattr(backbone, "patch_size", None)
    return upsample_scores(scores, (height, width), stride if isinstance(stride, int) else None).argmax(1)[0].cpu()


def cluster_map(clusters: int) -> ClassMap:
    """Display names ``cluster_0 ...`` and palette colours for unmatched cluster ids."""
    return ClassMap(names=tuple(f"cluster_{i}" for i in range(clusters)), colors=tuple(default_palette(clusters)))


def match_clusters(exported: ExportedHead, backbone: torch.nn.Module, labelled: str | Path,
                   class_map: ClassMap | str | Path | None = None, device: str | torch.device = "cpu",
                   precision: str = "bf16", window: int | None = DEFAULT_WINDOW) -> tuple[np.ndarray, ClassMap]:
    """Map clusters to classes with a few labelled images.

    Returns ``(mapping [K], class_map)``: ``mapping[k]`` is the class of cluster ``k`` by
    Hungarian matching on the ``[C, K]`` confusion over all labelled pixels of ``labelled``;
    clusters left unmatched (K > C) get the class they overlap most.
    """
    torch_device = torch.device(device) if not isinstance(device, torch.device) else device
    dataset = FolderDataset(labelled, class_map)
    k = int(exported.centroids.shape[0])
    confusion = ConfusionMatrix(dataset.class_map.num_classes, ignore_index=dataset.class_map.ignore_index,
                                num_pred=k)
    for index in range(len(dataset)):
        sample = dataset[index]
        confusion.update(predict_clusters(exported, backbone, sample["image"], torch_device, precision, window)[None],
                         sample["mask"][None])
    counts = confusion.matrix.cpu().numpy()
    mapping = np.asarray(hungarian_match(counts))
    return mapping, dataset.class_map


def predict(model_dir: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, *,
            match_with: str | Path | None = None, class_map: str | Path | None = None, device: str = "auto",
            precision: str = "bf16", alpha: float = 0.5, window: int | None = DEFAULT_WINDOW) -> list[Path]:
    """Segment every image of ``inputs`` (files or folders); see the module docstring. Images with
    a side above ``window`` pixels go through the backbone window by window (None: whole).
    Returns the written ``ids/`` PNG paths."""
    exported = load_head(model_dir)
    torch_device = resolve_device(device)
    backbone = exported.backbone.to(torch_device)
    out = Path(out_dir)
    k = int(exported.centroids.shape[0])
    mapping: np.ndarray | None = None
    display = cluster_map(k)
    if match_with is not None:
        mapping, display = match_clusters(exported, backbone, match_with, class_map, torch_device, precision, window)
        record: dict[str, Any] = {"clusters": k, "matched_with": str(match_with),
                                  "mapping": {f"cluster_{i}": display.names[int(c)] for i, c in enumerate(mapping)}}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MAPPING_FILE, record)
    written = []
    for path in list_images(inputs):
        image = read_image(path)
        tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
        clusters = predict_clusters(exported, backbone, tensor, torch_device, precision, window).numpy()
        write_id_png(clusters, out / "clusters" / f"{path.stem}.png", k - 1)
        labels = clusters if mapping is None else mapping[clusters]
        written.append(write_prediction_pngs(labels, image, display, out, path.stem, alpha)["ids"])
    return written
