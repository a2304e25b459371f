"""Benchmark imagenet_check: 1,000-way ImageNet top-1 of the shared MobileNetV2 weights on Imagenette images.

Checks that labelwise's MobileNetV2 (``labelwise.models.MobileNetV2``) with
``../shared/weights/mobilenet_v2_imagenet.pth`` computes what the TF-slim network computed: each
image of ``../shared/data/unlabeled/imagenette`` (the file-name prefix is its ImageNet class id)
is resized to 224x224 (bilinear), scaled to [-1, 1] (the file's input convention) and classified
over all 1,000 classes, once with TF 'SAME' padding (the file's own) and once with symmetric
padding. Two image sets: the first 40 files of each class in name order (400 images, the count of
the weights' model card) and every file (9,469). Imagenette overlaps ImageNet's own images, so
this confirms the weights and the forward pass; it is not an accuracy claim.

Run from the project root: `.venv/bin/python benchmarks/imagenet_check.py` (about 8 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import SHARED_DATA, write_results
from labelwise.models import MobileNetV2
from labelwise.models.pretrained import CONVENTIONS, load_strict, read_weights, resolve_weights

#: ImageNet-1k class index of each Imagenette class id (the usual 1,000-class order).
IMAGENETTE_CLASSES = {
    "n01440764": 0,    # tench
    "n02102040": 217,  # English springer
    "n02979186": 482,  # cassette player
    "n03000684": 491,  # chain saw
    "n03028079": 497,  # church
    "n03394916": 566,  # French horn
    "n03417042": 569,  # garbage truck
    "n03425413": 571,  # gas pump
    "n03445777": 574,  # golf ball
    "n03888257": 701,  # parachute
}
SIZE = 224


def image_sets(folder: Path, per_class: int) -> dict[str, list[Path]]:
    files = sorted(folder.glob("*.jpg"))
    first: list[Path] = []
    counts: dict[str, int] = {}
    for path in files:
        class_id = path.name.split("_")[0]
        if class_id not in IMAGENETTE_CLASSES:
            raise SystemExit(f"{path}: file name does not start with one of the ten Imagenette class ids")
        if counts.get(class_id, 0) < per_class:
            counts[class_id] = counts.get(class_id, 0) + 1
            first.append(path)
    return {f"first_{per_class}_per_class": first, "all": files}


def load_batch(paths: list[Path]) -> torch.Tensor:
    arrays = [np.array(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=40, help="images per class of the small set")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--sets", nargs="+", default=["first", "all"], choices=["first", "all"],
                        help="image sets: the first --per-class files of each class, and/or every file")
    args = parser.parse_args()
    folder = SHARED_DATA / "unlabeled" / "imagenette"
    if not folder.is_dir():
        raise SystemExit(f"benchmark needs the Imagenette images at {folder} (../shared/data beside the project)")
    weights_file = resolve_weights("mobilenet_v2_imagenet")
    state = read_weights(weights_file)
    convention = CONVENTIONS["tf"]
    mean = torch.tensor(convention.mean).view(1, 3, 1, 1)
    std = torch.tensor(convention.std).view(1, 3, 1, 1)
    models = {}
    for padding in ("tf_same", "symmetric"):
        model = MobileNetV2(padding_rule=padding).eval()
        load_strict(model, state, weights_file)
        models[padding] = model
    ten = torch.tensor(sorted(IMAGENETTE_CLASSES.values()))
    rows = []
    sets = image_sets(folder, args.per_class)
    chosen = {name: paths for name, paths in sets.items() if name.split("_")[0] in args.sets}
    for set_name, paths in chosen.items():
        labels = torch.tensor([IMAGENETTE_CLASSES[p.name.split("_")[0]] for p in paths])
        correct = {padding: 0 for padding in models}
        correct_ten = {padding: 0 for padding in models}
        seconds = {padding: 0.0 for padding in models}
        for start in range(0, len(paths), args.batch_size):
            batch = (load_batch(paths[start:start + args.batch_size]) - mean) / std
            target = labels[start:start + args.batch_size]
            for padding, model in models.items():
                began = time.perf_counter()
                with torch.no_grad():
                    logits = model(batch)
                seconds[padding] += time.perf_counter() - began
                correct[padding] += int((logits.argmax(1) == target).sum())
                correct_ten[padding] += int((ten[logits[:, ten].argmax(1)] == target).sum())
        for padding in models:
            rows.append({"method": "mobilenet_v2_imagenet", "dataset": "imagenette", "split": set_name,
                         "padding": padding, "input": "[-1, 1]", "top1": correct[padding] / len(paths),
                         "top1_among_10": correct_ten[padding] / len(paths), "images": len(paths),
                         "images_per_second": round(len(paths) / seconds[padding], 1)})
            print(rows[-1], flush=True)
    write_results("imagenet_check", rows, torch.device("cpu"), extra={"weights": str(weights_file.name)})


if __name__ == "__main__":
    main()
