"""Benchmark wide_context_aerial (issue 27): the wide-context model against the same encoder-decoder
with a plain sliding window, at the same budget, on the aerial tiles (train 1-5, evaluate 6-7).

Both rows start from `configs/aerial_unet_mobilenet_v2.yaml` (the U-Net on the ImageNet
MobileNetV2) and change only what the comparison needs: training windows are `data.tile_crop`
crops of the tiles (no augmentation crop), evaluation slides windows of that size; the
`wide_context` row wraps the same U-Net (`model.name=wide_context`, `local: unet`) so that each
window also sees the region `context_scale` (3) times larger around it, and adds the decaying
auxiliary context loss. Same steps, batch and windows: the same images seen; the CPU minutes
differ (the context branch runs the encoder a second time) and are in the rows.

Run from the project root: `.venv/bin/python benchmarks/wide_context_aerial.py` (both rows;
`--methods sliding_window`, `--steps 20 --suffix _smoke` for a quick check). Results:
`benchmarks/results/wide_context_aerial.json`, rows `method`, `miou`, `per_class_iou`,
`train_seconds`, `images_per_second`, `seconds_per_tile`, `images_seen`.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from torch.utils.data import Subset

from _common import RESULTS, ROOT, require_data, write_results
from labelwise.config import TrainConfig, load_config
from labelwise.data.build import build_eval_dataset
from labelwise.engine.runtime import resolve_device
from labelwise.eval.evaluate import evaluate_model
from labelwise.methods import supervised
from labelwise.models.export import load_model

CONFIG = "configs/aerial_unet_mobilenet_v2.yaml"
LOCAL_OPTIONS = "{encoder: mobilenet_v2, encoder_weights: imagenet, dropout: 0.1}"


def overrides(method: str, window: int, steps: int, context_scale: float) -> list[str]:
    common = [f"data.tile_crop={window}", "stages.0.augment.crop_size=null", f"stages.0.steps={steps}",
              f"eval.window={window}"]
    if method == "sliding_window":
        return common
    return [*common, "model.name=wide_context",
            f"model.options={{local: unet, local_options: {LOCAL_OPTIONS}, context_scale: {context_scale}}}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["sliding_window", "wide_context"],
                        choices=["sliding_window", "wide_context"])
    parser.add_argument("--steps", type=int, default=1100, help="training steps of each row (the aerial recipe's)")
    parser.add_argument("--window", type=int, default=384, help="window (tile crop) side in pixels")
    parser.add_argument("--context-scale", type=float, default=3.0)
    parser.add_argument("--set", dest="extra", action="append", default=[], help="more config overrides, both rows")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    root = require_data("dubai_aerial")
    previous = RESULTS / f"wide_context_aerial{args.suffix}.json"
    rows = [r for r in (json.loads(previous.read_text())["rows"] if previous.exists() else [])
            if r["method"] not in args.methods]
    device = None
    for method in args.methods:
        run_dir = ROOT / "benchmarks" / "runs" / f"wide_context_aerial{args.suffix}" / method
        config = load_config(TrainConfig, ROOT / CONFIG, [f"data.root={root}", f"run_dir={run_dir}",
                                                          *overrides(method, args.window, args.steps,
                                                                     args.context_scale), *args.extra])
        device = resolve_device(config.device)
        result = supervised.train(config, resume=args.resume, overwrite=not args.resume)
        metrics = json.loads((run_dir / "eval.json").read_text())  # every labeled pixel of tiles 6-7
        model = load_model(run_dir).model.to(device)
        dataset, class_map = build_eval_dataset(config.data)
        start = time.perf_counter()  # inference time of one whole tile (prediction + scoring)
        evaluate_model(model, Subset(dataset, [0]), class_map.num_classes, config.eval, device, config.precision,
                       class_map.ignore_index)
        seconds = time.perf_counter() - start
        row = {"method": method, "miou": round(metrics["miou"], 4), "pixel_acc": round(metrics["pixel_acc"], 4),
               "per_class_iou": {name: None if v is None or math.isnan(v) else round(float(v), 4)
                                 for name, v in metrics["per_class_iou"].items()},
               "train_seconds": round(result.train.train_seconds, 1),
               "images_per_second": round(result.train.images_per_second, 2),
               "seconds_per_tile": round(seconds, 1), "steps": result.train.steps,
               "images_seen": result.train.steps * config.data.batch_size, "window": args.window,
               "context_scale": args.context_scale if method == "wide_context" else None,
               "selection": "final_checkpoint"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results("wide_context_aerial", rows, device, extra={"config": CONFIG, "overrides": args.extra},
                      suffix=args.suffix)


if __name__ == "__main__":
    main()
