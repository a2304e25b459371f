"""Figures: class-token attention of the pretrained ViT on 4 CamVid val images (the DINO picture).

Run from the project root: `.venv/bin/python benchmarks/attention_figures.py [--backbone PATH]`
(default: `src/labelwise/weights/labelwise_vit.safetensors`; a minute on 2 CPU cores). Writes, for each image,
`labelwise attention`'s PNGs of the pretrained ViT (every head, the head mean, the overlay) under
`benchmarks/figures/attention/<stem>/`, and one overview per backbone at half size,
`benchmarks/figures/attention_camvid_<backbone>.png`: a row per image with the image, the
overlay and every head, min-max normalised. The same ViT at random init gets an overview too,
for comparison. Images: four of camvid/val evenly spaced in file-name order (indices 0, 25, 50, 75; no
selection by content).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import ROOT, ensure_default_backbone, require_data
from labelwise.models.vit import VisionTransformer
from labelwise.models.vit_loading import DEFAULT_BACKBONE_PATH, load_vit
from labelwise.report.attention import (
    attention_maps,
    colormap,
    load_image_tensor,
    minmax_normalise,
    overlay,
    save_attention_pngs,
    write_rgb_png,
)

FIGURES = ROOT / "benchmarks" / "figures"


def overview_row(image: torch.Tensor, maps: torch.Tensor, gap: int) -> np.ndarray:
    """uint8 ``[H, (2 + heads) * (W + gap), 3]``: image, overlay of the head mean, each head."""
    rgb = np.clip(image.permute(1, 2, 0).numpy() * 255 + 0.5, 0, 255).astype(np.uint8)
    values = maps.double().numpy()
    mean = colormap(minmax_normalise(values.mean(0)))
    panels = [rgb, overlay(rgb, mean, 0.5), *(colormap(minmax_normalise(m)) for m in values)]
    spacer = np.full((rgb.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([p for panel in panels for p in (panel, spacer)][:-1], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", type=Path, default=None,
                        help=f"pretrained ViT checkpoint (default: {DEFAULT_BACKBONE_PATH.relative_to(ROOT)}, rebuilt "
                        "with benchmarks/pretrain_dino.py when missing)")
    parser.add_argument("--images", type=int, default=4, help="number of camvid/val images")
    parser.add_argument("--size", type=int, default=360, help="shorter image side in pixels (CamVid: 360 = as stored)")
    args = parser.parse_args()
    root = require_data("camvid")
    every = sorted(p for p in (root / "val" / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    files = every[:: max(1, len(every) // args.images)][: args.images]  # evenly spaced: consecutive frames look alike
    pretrained = load_vit(args.backbone or ensure_default_backbone())
    torch.manual_seed(0)
    backbones = {"pretrained": pretrained, "random": VisionTransformer(pretrained.config)}
    for name, vit in backbones.items():
        rows = []
        for path in files:
            image = load_image_tensor(path, args.size)
            maps = attention_maps(vit, image, -1)
            if name == "pretrained":
                save_attention_pngs(maps, image, FIGURES / "attention" / path.stem)
            rows.append(overview_row(image, maps, gap=4))
        spacer = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
        grid = np.concatenate([p for row in rows for p in (row, spacer)][:-1], axis=0)
        out = FIGURES / f"attention_camvid_{name}.png"
        half = Image.fromarray(grid).resize((grid.shape[1] // 2, grid.shape[0] // 2), Image.BOX)
        write_rgb_png(np.asarray(half), out)
        print(f"wrote {out} ({half.width}x{half.height})")


if __name__ == "__main__":
    main()
