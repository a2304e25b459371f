"""Benchmark feature_throughput: images/s of extract_features vs the bare ViT forward, same run.

Run from the project root: `.venv/bin/python benchmarks/feature_throughput.py` (several minutes;
`--quick` is a smoke test of a few batches that writes `feature_throughput_quick.json`).

For ViT-S/16 and ViT-S/8 (random initialisation: speed does not depend on the weights) at
224x224, in fp32 and bf16:

- ``forward``: the images, already decoded and resized to 224x224 in memory, go through
  ``backbone(images)`` in batches under ``torch.no_grad`` (and bf16 autocast); the time of the
  forwards alone.
- ``pipeline``: ``extract_features`` with its defaults over the same CamVid image files end to
  end: hashing the weights for the key, decoding JPEG/PNG and resizing (in this process on a CPU
  device: ``default_num_workers``), the backbone, writing the float16 memmap cache and its
  manifest (into a fresh temporary folder, so it really extracts).
- ``pipeline_one_worker``: the same with ``num_workers=1`` (loading in a DataLoader worker
  process, overlapped with the backbone), to show what a worker costs or buys on this machine.

Target: pipeline >= 0.8 x forward. One warm-up batch precedes the measurements.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from _common import require_data, write_results
from labelwise.data.io import read_image
from labelwise.engine.runtime import autocast, resolve_device
from labelwise.features.cache import extract_features, normalise_preprocessing, preprocess
from labelwise.models.vit import create_vit

SIZE = 224


class ImageFiles(Dataset):
    """Image files as ``{"image": float [3, H, W] in [0, 1], "name": stem}`` (no labels)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.names = [f"{f.parent.parent.name}/{f.stem}" for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        array = np.ascontiguousarray(read_image(self.files[index]).transpose(2, 0, 1))  # uint8 [3, H, W]
        return {"image": torch.from_numpy(array).float().div_(255), "name": self.names[index]}


def camvid_files(count: int) -> list[Path]:
    root = require_data("camvid")
    files = sorted((root / "train" / "images").iterdir()) + sorted((root / "val" / "images").iterdir())
    return files[:count]


@torch.no_grad()
def forward_speed(model: torch.nn.Module, images: torch.Tensor, batch_size: int, precision: str,
                  device: torch.device) -> float:
    model.eval()
    with autocast(device, precision):
        model(images[:batch_size].to(device))  # warm-up
        start = time.perf_counter()
        for index in range(0, len(images), batch_size):
            model(images[index:index + batch_size].to(device)).patch_tokens.float().cpu()
    return len(images) / (time.perf_counter() - start)


def pipeline_speed(model: torch.nn.Module, dataset: Dataset, batch_size: int, precision: str, device: torch.device,
                   workers: int | None) -> float:
    with tempfile.TemporaryDirectory(prefix="feature_throughput_") as cache_dir:
        start = time.perf_counter()
        cache = extract_features(model, dataset, batch_size=batch_size, precision=precision, device=device,
                                 cache_dir=cache_dir, preprocessing={"resize": [SIZE, SIZE]}, num_workers=workers)
        seconds = time.perf_counter() - start
        assert cache.extracted and cache.features.shape[0] == len(dataset)
    return len(dataset) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="CamVid images per measurement")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 images, batches of 4")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _gpu")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch_size = 8, 4
    device = resolve_device(args.device)
    files = camvid_files(args.images)
    dataset = ImageFiles(files)
    prep = normalise_preprocessing({"resize": [SIZE, SIZE]})
    images = torch.stack([preprocess(dataset[i]["image"], None, prep)[0] for i in range(len(dataset))])
    rows = []
    for patch in (16, 8):
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = create_vit("vit_small", patch_size=patch).to(device)
            forward = forward_speed(model, images, args.batch_size, precision, device)
            pipeline = pipeline_speed(model, dataset, args.batch_size, precision, device, workers=None)
            one_worker = pipeline_speed(model, dataset, args.batch_size, precision, device, workers=1)
            row = {"method": "extract_features", "dataset": "camvid", "arch": "vit_small", "patch": patch,
                   "precision": precision, "input_size": [SIZE, SIZE], "images": len(dataset),
                   "batch_size": args.batch_size, "forward_images_per_second": round(forward, 2),
                   "pipeline_images_per_second": round(pipeline, 2),
                   "pipeline_one_worker_images_per_second": round(one_worker, 2),
                   "pipeline_over_forward": round(pipeline / forward, 3)}
            rows.append(row)
            print(f"ViT-S/{patch} {precision}: forward {forward:.1f} img/s, pipeline {pipeline:.1f} img/s "
                  f"({pipeline / forward:.2f}x), with one worker {one_worker:.1f} img/s")
    worst = min(row["pipeline_over_forward"] for row in rows)
    write_results("feature_throughput", rows, device,
                  extra={"target": "pipeline >= 0.8 x forward", "worst_ratio": worst, "quick": args.quick,
                         "torch_version": torch.__version__, "numpy_version": np.__version__},
                  suffix=args.suffix + ("_quick" if args.quick else ""))


if __name__ == "__main__":
    main()
