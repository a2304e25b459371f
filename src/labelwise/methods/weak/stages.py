"""Stages 2 and 3 of weak supervision over a dataset: CAMs and pseudo-masks of every tagged
training image, written as PNGs and scored against ground truth when the images have masks.

``make_pseudo_masks(classifier_dir, items, out_dir, ...)`` runs the exported classifier on each
image at its own size (consecutive images of the same size in batches of ``batch_size``):
CAMs (:func:`~labelwise.methods.weak.cams.class_activation_maps`), then pseudo-masks
(:func:`~labelwise.methods.weak.pseudo_masks.pseudo_masks`). It writes

- ``out_dir/cams/<name>/<class>.png`` (with ``write_cams``): each tagged class's map (refined when
  ``pseudo_masks.refine`` is on), 8-bit;
- ``out_dir/pseudo/train/images/<name>.png`` and ``out_dir/pseudo/train/labels/<name>.png``
  (class ids, ``ignore_index`` where unsure) and ``out_dir/pseudo/classes.json``: a labelwise
  folder dataset, so the second stage is an ordinary ``labelwise train --set
  data.dataset=folder --set data.root=out_dir/pseudo``;

and returns the scores when the items carry masks: ``cams`` (argmax of the CAMs over the tagged
classes, plus the background rule when there is a background class, on every labeled pixel),
``cams_refined`` (the same of the refined CAMs, with ``pseudo_masks.refine: par``) and
``pseudo_masks`` (the pseudo-labels on the labeled pixels they keep; ``kept_fraction`` is the
share of labeled pixels not ignored).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from labelwise.data.classmap import ClassMap
from labelwise.eval.metrics import ConfusionMatrix
from labelwise.io.atomic import atomic_write_json
from labelwise.methods.weak.cams import CAMConfig, class_activation_maps, classifier_features
from labelwise.methods.weak.pseudo_masks import PseudoMaskConfig, pseudo_masks, refine_cams
from labelwise.methods.weak.train import load_classifier
from labelwise.report.png import write_gray_png, write_id_png, write_rgb_png

__all__ = ["make_pseudo_masks", "same_size_batches"]


def same_size_batches(items: Iterable[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive items grouped while their images have the same size, at most ``batch_size``."""
    batch: list[dict[str, Any]] = []
    for item in items:
        if batch and (len(batch) == batch_size or batch[0]["image"].shape != item["image"].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _cam_labels(cams: torch.Tensor, tags: torch.Tensor, config: PseudoMaskConfig) -> torch.Tensor:
    """Argmax of the CAMs over the tagged classes (and the background rule): no ignore."""
    return pseudo_masks(cams, tags, PseudoMaskConfig(background_class=config.background_class,
                                                     background_threshold=config.background_threshold,
                                                     ignore_fraction=0.0, ignore_index=config.ignore_index))


@torch.no_grad()
def make_pseudo_masks(classifier_dir: str | Path, items: Iterable[dict[str, Any]], out_dir: str | Path,
                      cam_config: CAMConfig | None = None, mask_config: PseudoMaskConfig | None = None,
                      batch_size: int = 8, write_cams: bool = True, write_pseudo: bool = True,
                      device: torch.device | str = "cpu", cam_limit: int | None = None) -> dict[str, Any]:
    """Stages 2-3 (module docstring). ``items``: ``{"image" [3, H, W], "tags" [K], "name"}``
    (+ ``"mask"`` to be scored), e.g. :class:`~labelwise.methods.weak.data.TaggedImages` with
    ``size=None``. ``write_cams`` / ``write_pseudo`` switch the two kinds of PNG output;
    ``cam_limit``: CAM PNGs of the first ``cam_limit`` images only (``weak run`` keeps a few for
    its report)."""
    cam_config = cam_config or CAMConfig()
    mask_config = mask_config or PseudoMaskConfig()
    model, summary = load_classifier(classifier_dir)
    model.to(device)
    class_names = list(summary["class_names"])
    class_map = ClassMap.from_names(class_names, ignore_index=mask_config.ignore_index)
    out = Path(out_dir)
    pseudo_root = out / "pseudo"
    if write_pseudo:
        atomic_write_json(pseudo_root / "classes.json", {"classes": class_names})
    k = len(class_names)
    cam_matrix = ConfusionMatrix(k, mask_config.ignore_index)
    refined_matrix = ConfusionMatrix(k, mask_config.ignore_index)
    pseudo_matrix = ConfusionMatrix(k, mask_config.ignore_index)
    labeled = kept = images_done = 0
    for batch in same_size_batches(items, batch_size):
        images = torch.stack([item["image"] for item in batch]).to(device)
        tags = torch.stack([torch.as_tensor(item["tags"]) for item in batch]).bool().to(device)
        cams = class_activation_maps(model, images, tags, cam_config)
        features = (classifier_features(model, images)
                    if mask_config.refine == "par" and mask_config.par.feature_weight > 0 else None)
        refined = refine_cams(cams, tags, images, mask_config, features)
        labels = pseudo_masks(refined, tags, mask_config, images=images)
        if all("mask" in item for item in batch):
            target = torch.stack([torch.as_tensor(item["mask"]) for item in batch]).long().to(device)
            ignore = mask_config.ignore_index
            # an image without any candidate class has no CAM label: scored as class 0
            scored = [(cams, cam_matrix)] + ([(refined, refined_matrix)] if mask_config.refine != "none" else [])
            for maps, matrix in scored:
                cam_labels = _cam_labels(maps, tags, mask_config)
                matrix.update(cam_labels.masked_fill(cam_labels == ignore, 0), target)
            valid = target != ignore
            unsure = labels == ignore
            labeled += int(valid.sum())
            kept += int((valid & ~unsure).sum())
            pseudo_matrix.update(labels.masked_fill(unsure, 0), target.masked_fill(unsure, ignore))
        for index, item in enumerate(batch):
            name = str(item["name"])
            if write_pseudo:
                rgb = (images[index].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
                write_rgb_png(rgb, pseudo_root / "train" / "images" / f"{name}.png")
                write_id_png(labels[index].cpu().numpy(), pseudo_root / "train" / "labels" / f"{name}.png",
                             max(k - 1, mask_config.ignore_index))
            if write_cams and (cam_limit is None or images_done + index < cam_limit):
                for c in torch.nonzero(tags[index]).flatten().tolist():
                    heat = (refined[index, c].clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()
                    write_gray_png(heat, out / "cams" / name / f"{class_names[c]}.png")
        images_done += len(batch)
    report: dict[str, Any] = {"images": images_done, "classes": class_names,
                              "pseudo_root": str(pseudo_root) if write_pseudo else None}
    if labeled:
        report["cams"] = cam_matrix.compute().to_dict(class_map.names)
        if mask_config.refine != "none":
            report["cams_refined"] = refined_matrix.compute().to_dict(class_map.names)
        report["pseudo_masks"] = pseudo_matrix.compute().to_dict(class_map.names)
        report["pseudo_masks"]["kept_fraction"] = kept / labeled
    atomic_write_json(out / "pseudo_masks.json", {k_: (None if isinstance(v, float) and math.isnan(v) else v)
                                                  for k_, v in report.items()})
    return report
