"""Figure: MCTformer CAMs on 4 CamVid training images (weak_camvid).

Run from the project root after `benchmarks/weak.py --dataset camvid`:
`.venv/bin/python benchmarks/weak_figure.py [--backbone pretrained|random]`. Uses the classifier
exported in `benchmarks/runs/weak_camvid/<backbone>/` and the CAM / pseudo-mask settings of
`configs/weak_camvid.yaml`. Writes `benchmarks/figures/weak_camvid_<backbone>.png`, a row per
image at half size: the image, the CAM of each tagged class (color map, titled by nothing: the
classes are in the order of `classes.json`, untagged classes left white), the pseudo-mask
(ignored pixels black) and the ground truth, in the CamVid colors. Images: four of camvid/train
evenly spaced in file-name order (indices 0, 90, 180, 270; no selection by content).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from _common import ROOT, require_data
from labelwise.config import load_config
from labelwise.methods import weak
from labelwise.methods.weak.cams import class_activation_maps
from labelwise.methods.weak.data import TaggedImages
from labelwise.methods.weak.pseudo_masks import pseudo_masks
from labelwise.methods.weak.train import load_classifier, tagged_training_images
from labelwise.report.attention import colormap
from labelwise.report.png import write_rgb_png

INDICES = (0, 90, 180, 270)


def half(panel: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> ``[H / 2, W / 2, 3]`` (area average)."""
    tensor = torch.from_numpy(panel).permute(2, 0, 1)[None].float()
    return F.avg_pool2d(tensor, 2)[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", choices=("pretrained", "random"), default="pretrained")
    args = parser.parse_args()
    root = require_data("camvid")
    run_dir = ROOT / "benchmarks" / "runs" / "weak_camvid" / args.backbone
    config = load_config(weak.WeakConfig, ROOT / "configs" / "weak_camvid.yaml", [f"data.root={root}"])
    model, summary = load_classifier(run_dir)
    dataset, class_map = tagged_training_images(config, whole=True)
    items = TaggedImages(dataset.source, dataset.num_classes, None, min_fraction=dataset.min_fraction,
                         ignore_index=dataset.ignore_index)
    colors = np.asarray(class_map.colors, np.uint8)
    gap = np.full((180, 4, 3), 255, np.uint8)
    rows = []
    for index in INDICES:
        item = items[index]
        image, tags = item["image"][None], item["tags"][None].bool()
        cams = class_activation_maps(model, image, tags, config.cams)
        labels = pseudo_masks(cams, tags, config.pseudo_masks, images=image)[0].numpy()
        rgb = (image[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        panels = [rgb]
        for k in range(class_map.num_classes):
            panels.append(colormap(cams[0, k].numpy()) if tags[0, k] else np.full_like(rgb, 255))
        ignore = labels == class_map.ignore_index
        pseudo = colors[np.where(ignore, 0, labels)]
        pseudo[ignore] = 0
        mask = item["mask"].numpy()
        truth = colors[np.clip(mask, 0, class_map.num_classes - 1)]
        truth[mask == class_map.ignore_index] = 0
        panels += [pseudo, truth]
        rows.append(np.concatenate([p for panel in panels for p in (half(panel), gap)][:-1], axis=1))
    spacer = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    figure = np.concatenate([r for row in rows for r in (row, spacer)][:-1], axis=0)
    out = ROOT / "benchmarks" / "figures" / f"weak_camvid_{args.backbone}.png"
    write_rgb_png(figure, out)
    print(f"{out} ({summary['class_names']})")


if __name__ == "__main__":
    main()
