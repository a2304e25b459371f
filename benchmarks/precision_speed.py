"""Benchmark precision_speed: training images/s of the segmentation models in fp32 and in bf16 autocast, same run.

Run from the project root: `.venv/bin/python benchmarks/precision_speed.py` (a few minutes per model).
The models: the CamVid benchmark's plain U-Net (width 32, depth 4), the U-Net and DeepLabV3+
(output stride 16) on the MobileNetV2 encoder (random weights: speed does not depend on them),
each on 176x240 crops, batch 8, with the full training step (augmentation, CE + Dice, AdamW;
the encoder's BatchNorm frozen as when fine-tuning the ImageNet file). Synthetic images are used
because the speed does not depend on the pixels. The first log window (warm-up) is excluded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import ROOT, write_results
from labelwise.config import TrainConfig, load_config
from labelwise.engine.runtime import resolve_device
from labelwise.methods import supervised

#: row label -> (model config overrides, encoder, encoder_weights label)
MODELS = {
    "unet": (["model.name=unet", "model.options={width: 32, depth: 4}"], "none", "none"),
    "unet_mobilenet_v2": (["model.name=unet", "model.options={encoder: mobilenet_v2, encoder_weights: null}",
                           "model.freeze_encoder_bn=true"], "mobilenet_v2", "random"),
    "deeplabv3plus_mobilenet_v2": (["model.name=deeplabv3plus", "model.options={encoder_weights: null}",
                                    "model.freeze_encoder_bn=true"], "mobilenet_v2", "random"),
}


def measure(model: str, precision: str, steps: int, device: str, run_dir: Path) -> float:
    config = load_config(TrainConfig, None, [
        "data.dataset=synthetic", "data.synthetic_size=[176, 240]", "data.synthetic_train_images=64",
        "data.synthetic_val_images=8", "data.synthetic_classes=11", "data.batch_size=8",
        *MODELS[model][0],
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
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to measure")
    args = parser.parse_args()
    rows = []
    ratios = {}
    for model in args.models:
        speeds = {}
        for precision in ("fp32", "bf16"):
            run_dir = ROOT / "benchmarks" / "runs" / f"precision_{model}_{precision}"
            speeds[precision] = measure(model, precision, args.steps, args.device, run_dir)
            name = model.replace("_mobilenet_v2", "")
            rows.append({"method": name, "encoder": MODELS[model][1], "encoder_weights": MODELS[model][2],
                         "dataset": "synthetic", "split": "train", "precision": precision,
                         "images_per_second": round(speeds[precision], 2), "input_size": [176, 240],
                         "batch_size": 8})
            print(model, precision, f"{speeds[precision]:.2f} images/s", flush=True)
        ratios[model] = round(speeds["bf16"] / speeds["fp32"], 2)
        print(f"{model}: bf16 / fp32 = {ratios[model]:.2f}", flush=True)
    write_results("precision_speed", rows, resolve_device(args.device),
                  extra={"bf16_over_fp32": ratios.get("unet"), "bf16_over_fp32_by_model": ratios}, suffix=args.suffix)


if __name__ == "__main__":
    main()
