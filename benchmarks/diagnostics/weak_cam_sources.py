"""Diagnostic (not a benchmark): what each CAM ingredient of a trained MCT classifier is worth.

Usage (project root): `.venv/bin/python benchmarks/diagnostics/weak_cam_sources.py RUN_DIR CONFIG [KEY=VALUE ...]`
where RUN_DIR is a `labelwise weak train` run folder (its classifier export) and CONFIG is the weak
YAML it was trained with. Prints, for up to 64 training images (their masks are used for the
scores only):

- tag separation of the class-token scores and of the patch scores (mean logit when the class
  is tagged / not tagged, and the tag accuracy at logit 0): tag-level, no pixel labels;
- how alike the attention maps of different classes are (mean correlation between classes);
- CAM mIoU (argmax over the tagged classes, with the configured background rule) of attention only, patch CAMs only, their product,
  each without and with patch-to-patch refinement.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from labelwise.config import load_config
from labelwise.eval.metrics import ConfusionMatrix
from labelwise.methods.weak import WeakConfig
from labelwise.methods.weak.cams import CAMConfig, class_activation_maps, refine_with_affinity
from labelwise.methods.weak.data import TaggedImages
from labelwise.methods.weak.stages import _cam_labels, same_size_batches
from labelwise.methods.weak.train import load_classifier, tagged_training_images
from labelwise.models.mctformer import patch_to_patch_attention

run_dir, config_path, *overrides = sys.argv[1:]
config = load_config(WeakConfig, Path(config_path), overrides)
model, summary = load_classifier(run_dir)
dataset, class_map = tagged_training_images(config, whole=True)
items_source = TaggedImages(dataset.source, dataset.num_classes, None, min_fraction=dataset.min_fraction,
                            ignore_index=dataset.ignore_index)
count = min(64, len(items_source))
items = [items_source[i] for i in range(count)]
k = class_map.num_classes


def patch_only_cams(images: torch.Tensor, refine: bool) -> torch.Tensor:
    """relu(patch CAMs) at the configured scales (optionally refined), upsampled: [B, K, H, W]."""
    height, width = images.shape[-2:]
    total = torch.zeros(images.shape[0], k, height, width)
    blocks = list(range(model.backbone.depth - config.cams.blocks, model.backbone.depth))
    for scale in scales:
        view = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        out = model(view, return_attention=blocks)
        h, w = out.patch_cams.shape[-2:]
        cams = F.relu(out.patch_cams.float()).flatten(2)
        if refine:
            cams = refine_with_affinity(cams, patch_to_patch_attention(out.attentions, blocks, model.num_prefix_tokens))
        total += F.interpolate(cams.reshape(-1, k, h, w), size=(height, width), mode="bilinear", align_corners=False)
    return total


scales = config.cams.scales
with torch.no_grad():
    sized = torch.stack([TaggedImages(dataset.source, k, config.image_size, min_fraction=dataset.min_fraction,
                                      ignore_index=dataset.ignore_index)[i]["image"] for i in range(count)])
    tags = torch.stack([item["tags"] for item in items]).bool()
    depth = model.backbone.depth
    output = model(sized, return_attention=[depth - 1])
    report = {"readout": summary.get("readout", "mean"), "images": count}
    for name, scores in (("class_token", output.scores), ("patch", output.patch_scores)):
        if scores is None:
            continue
        scores = scores.float()
        report[f"{name}_logit_tagged"] = round(float(scores[tags].mean()), 3)
        report[f"{name}_logit_untagged"] = round(float(scores[~tags].mean()), 3) if (~tags).any() else None
        report[f"{name}_tag_accuracy"] = round(float(((scores > 0) == tags).float().mean()), 3)
    attention = output.attentions[depth - 1].float().mean(1)[:, :k, model.num_prefix_tokens:]  # [B, K, P]
    centred = attention - attention.mean(-1, keepdim=True)
    centred = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    corr = centred @ centred.transpose(1, 2)
    off = ~torch.eye(k, dtype=torch.bool)
    report["attention_between_class_correlation"] = round(float(corr[:, off].mean()), 3)

    for fusion in ("attention", "patch", "product"):
        for refine in (False, True):
            matrix = ConfusionMatrix(k, class_map.ignore_index)
            for batch in same_size_batches(items, 16):
                images = torch.stack([i["image"] for i in batch])
                batch_tags = torch.stack([i["tags"] for i in batch]).bool()
                masks = torch.stack([i["mask"] for i in batch]).long()
                if fusion == "patch":
                    cams = patch_only_cams(images, refine)
                else:
                    cams = class_activation_maps(model, images, batch_tags,
                                                 CAMConfig(blocks=config.cams.blocks, fusion=fusion, refine=refine,
                                                           scales=scales))
                if fusion == "patch":  # normalise per class as class_activation_maps does
                    cams = F.relu(cams) * batch_tags[:, :, None, None]
                    cams = cams / cams.flatten(2).amax(2).clamp_min(1e-12)[:, :, None, None]
                labels = _cam_labels(cams, batch_tags, config.pseudo_masks)
                labels = labels.masked_fill(labels == config.pseudo_masks.ignore_index, 0)
                matrix.update(labels, masks)
            report[f"cam_miou_{fusion}{'_refined' if refine else ''}"] = round(float(matrix.compute().miou), 3)
print(json.dumps(report, indent=1))
