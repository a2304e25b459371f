"""Benchmark probe_camvid: frozen-feature quality of a ViT backbone vs the same ViT at random init.

Run from the project root: `.venv/bin/python benchmarks/probe_camvid.py [--backbone PATH]`
(default backbone: `src/labelwise/weights/labelwise_vit.safetensors`, the project's pretrained ViT; when it is
missing it is rebuilt with `benchmarks/pretrain_dino.py` first, or with `--no-rebuild` only the
random-init rows are computed and a note says why). `--quick` is a
smoke test on a few images that writes `probe_camvid_quick.json`.

Both backbones see CamVid at its full 360x480 resolution (no resizing; the ViT pads to its patch
size). Features are cached with ``extract_features`` (bf16; `--cache-dir`, default the user
cache, so a re-run reuses them).

- ``linear_probe``: a 1x1 conv trained by full-batch L-BFGS (up to 1,500 iterations; it
  converges in about 400) on camvid/train features (1024
  labeled pixels sampled per image, logits bilinearly upsampled to the label resolution),
  scored on every labeled pixel of camvid/val.
- ``kmeans``: k-means (K = 11, k-means++, 5 restarts) on the L2-normalised camvid/val features,
  clusters Hungarian-matched to classes over the whole split, scored on every labeled pixel.

Labels of camvid/val are used only for scoring: no hyper-parameter is chosen with them.

`--selection` is the protocol for choosing between pretraining recipes without camvid/val: the
probes are trained on the first half of camvid/train (file-name order, so mostly other video
sequences than the second half) and scored on the second half; rows get `split: train_b` and
the file the suffix `_selection`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from _common import ensure_default_backbone, require_data, write_results
from labelwise.data import CamVid
from labelwise.engine.runtime import resolve_device
from labelwise.eval.kmeans import kmeans_probe
from labelwise.eval.probes import linear_probe
from labelwise.features.cache import extract_features
from labelwise.models.vit import VisionTransformer, create_vit
from labelwise.models.vit_loading import DEFAULT_BACKBONE_PATH, load_vit


def rounded(metrics: dict, names: list[str]) -> dict:
    return {"miou": round(metrics["miou"], 4), "pixel_acc": round(metrics["pixel_acc"], 4),
            "mean_acc": round(metrics["mean_acc"], 4),
            "per_class_iou": {n: (None if v is None else round(v, 4)) for n, v in metrics["per_class_iou"].items()
                              if n in names}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", type=Path, default=None,
                        help=f"pretrained ViT checkpoint (default: {DEFAULT_BACKBONE_PATH} when present)")
    parser.add_argument("--arch", default="vit_small", help="architecture of the random-init backbone when no "
                        "pretrained one is available")
    parser.add_argument("--patch", type=int, default=16, help="patch size of that random-init backbone")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=16, help="images per backbone forward")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache folder (default: user cache)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 12 train and 6 val images")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _gpu")
    parser.add_argument("--selection", action="store_true", help="recipe-selection protocol: train on the first "
                        "half of camvid/train, score on the second half (camvid/val unused)")
    parser.add_argument("--no-rebuild", action="store_true", help="when the default backbone is missing, do not "
                        "rebuild it (random-init rows only)")
    args = parser.parse_args()
    root = require_data("camvid")
    device = resolve_device(args.device)

    backbones: dict[str, VisionTransformer] = {}
    note = None
    path = args.backbone or ensure_default_backbone(rebuild=not args.no_rebuild and not args.quick)
    if path is not None:
        backbones["pretrained"] = load_vit(path)
        torch.manual_seed(0)
        backbones["random"] = VisionTransformer(backbones["pretrained"].config)
    else:
        note = f"no pretrained backbone: {DEFAULT_BACKBONE_PATH} is missing (--no-rebuild) and --backbone was not given"
        print(f"note: {note}; computing the random-init rows only")
        torch.manual_seed(0)
        backbones["random"] = create_vit(args.arch, patch_size=args.patch)

    train: torch.utils.data.Dataset = CamVid(root, "train")
    val: torch.utils.data.Dataset = CamVid(root, "val")
    split = "val"
    if args.selection:
        half = len(train) // 2
        train, val, split = Subset(train, range(half)), Subset(train, range(half, len(train))), "train_b"
    names = list(CamVid(root, "val").class_map.names)
    num_classes = len(names)
    if args.quick:
        train, val = Subset(train, range(12)), Subset(val, range(6))
    rows = []
    for label, vit in backbones.items():
        config = vit.config
        common = {"dataset": "camvid", "split": split, "backbone": label, "arch": config.arch,
                  "patch": config.patch_size, "embed_dim": vit.embed_dim,
                  "backbone_path": str(path) if label == "pretrained" else None}
        start = time.perf_counter()
        caches = {part: extract_features(vit, data, batch_size=args.batch_size, precision="bf16", device=device,
                                          cache_dir=args.cache_dir, num_workers=None, progress=not args.quick)
                  for part, data in (("train", train), ("val", val))}
        extract_seconds = time.perf_counter() - start
        probe = linear_probe(caches["train"], caches["val"], num_classes=num_classes, pixels_per_image=1024,
                             max_iter=1500, device=device)
        rows.append({"method": "linear_probe", **common, **rounded(probe.to_dict(names), names),
                     "train_seconds": round(probe.seconds, 2), "extract_seconds": round(extract_seconds, 2),
                     "lbfgs_iterations": probe.iterations, "converged": probe.converged,
                     "train_images": len(caches["train"]), "val_images": len(caches["val"])})
        clusters = kmeans_probe(caches["val"], num_classes, num_classes=num_classes, restarts=2 if args.quick else 5,
                                device=device)
        rows.append({"method": "kmeans", **common, **rounded(clusters.to_dict(names), names),
                     "train_seconds": round(clusters.seconds, 2), "num_clusters": num_classes,
                     "val_images": len(caches["val"])})
        for row in rows[-2:]:
            print(f"{row['method']:>12} {label:>10}: mIoU {row['miou']:.3f}, pixel acc {row['pixel_acc']:.3f}")
    write_results("probe_camvid", rows, device, extra={"note": note, "quick": args.quick, "resolution": [360, 480]},
                  suffix=args.suffix + ("_selection" if args.selection else "") + ("_quick" if args.quick else ""))


if __name__ == "__main__":
    main()
