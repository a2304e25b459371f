"""Benchmark precision_speed: training images/s of one U-Net in fp32 and in bf16 autocast, same run.

Run from the project root: `.venv/bin/python benchmarks/precision_speed.py` (a few minutes).
The model is the CamVid benchmark's U-Net (width 32, depth 4) on 176x240 crops, batch 8, with
the full training step (augmentation, CE + Dice, AdamW). Synthetic images are used because the
speed does not depend on the pixels. The first log window (warm-up) is excluded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import ROOT, write_results

from labelwise.config import TrainConfig, load_config
from labelwise.engine.runtime import resolve_device
from labelwise.methods import supervised


def measure(precision: str, steps: int, device: str, run_dir: Path) -> float:
    config = load_config(TrainConfig, None, [
        "data.dataset=synthetic", "data.synthetic_size=[176, 240]", "data.synthetic_train_images=64",
        "data.synthetic_val_images=8", "data.synthetic_classes=11", "data.batch_size=8",
        "model.name=unet", "model.options={width: 32, depth: 4}",
        "loss.terms=[{name: ce, weight: 1.0}, {name: dice, weight: 0.5}]",
        f"stages.0.steps={steps}", "stages.0.augment.scale=[0.8, 1.25]",
        f"precision={precision}", f"device={device}", f"run_dir={run_dir}", "log_every=5", "progress=false",
        f"checkpoint_every={steps}",
    ])
    supervised.train(config, overwrite=True)
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [entry["images_per_second"] for entry in log if "images_per_second" in entry][1:]
    return sum(speeds) / len(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per precision")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _gpu")
    args = parser.parse_args()
    rows = []
    for precision in ("fp32", "bf16"):
        speed = measure(precision, args.steps, args.device, ROOT / "benchmarks" / "runs" / f"precision_{precision}")
        rows.append({"method": "unet", "dataset": "synthetic", "split": "train", "precision": precision,
                     "images_per_second": round(speed, 2), "input_size": [176, 240], "batch_size": 8})
        print(precision, f"{speed:.2f} images/s")
    ratio = rows[1]["images_per_second"] / rows[0]["images_per_second"]
    print(f"bf16 / fp32 = {ratio:.2f}")
    write_results("precision_speed", rows, resolve_device(args.device), extra={"bf16_over_fp32": round(ratio, 2)},
                  suffix=args.suffix)


if __name__ == "__main__":
    main()
