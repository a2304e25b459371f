"""Shared body of the supervised benchmarks: train from a YAML config, evaluate, write one row."""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import ROOT, require_data, write_results

from labelwise.config import TrainConfig, load_config
from labelwise.engine.runtime import resolve_device
from labelwise.methods import supervised


def parse_args(description: str, default_config: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=default_config, help="training config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _gpu for a separate GPU row set")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted benchmark run")
    return parser.parse_args()


def run(name: str, method: str, dataset: str, data_dir: str, description: str, default_config: str) -> None:
    args = parse_args(description, default_config)
    root = require_data(data_dir)
    config: TrainConfig = load_config(
        TrainConfig, ROOT / args.config,
        [f"data.root={root}", f"run_dir={ROOT / 'benchmarks' / 'runs' / (name + args.suffix)}", *args.overrides],
    )
    result = supervised.train(config, resume=args.resume, overwrite=not args.resume)
    metrics = result.metrics
    row = {
        "method": method,
        "dataset": dataset,
        "split": config.data.val_split if config.data.dataset != "aerial" else "tiles " + ",".join(map(str, config.data.val_tiles)),
        "miou": metrics["miou"],
        "pixel_acc": metrics["pixel_acc"],
        "mean_acc": metrics.get("mean_acc"),
        "per_class_iou": metrics["per_class_iou"],
        "train_seconds": round(result.train.train_seconds, 1),
        "images_per_second": round(result.train.images_per_second, 2),
        "precision": config.precision,
        "steps": config.total_steps,
        "config": args.config,
    }
    write_results(name, [row], resolve_device(config.device), suffix=args.suffix)
