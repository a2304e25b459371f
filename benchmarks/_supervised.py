"""Shared body of the supervised benchmarks: train from a YAML config, evaluate, write the rows.

Two rows per run: the plain evaluation and the same model with flip test-time augmentation.
``--eval-only`` re-evaluates a finished benchmark run without training again.

Every row carries ``encoder`` (``none`` for the encoder-less models, else e.g. ``mobilenet_v2``)
and ``encoder_weights`` (``none``, ``imagenet``, ``random``), its own ``commit`` and ``command``.
A run replaces the rows of the same method, encoder and weights in the results file and keeps the
others, so one file tables several models.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from _common import RESULTS, ROOT, START_COMMIT, command_line, require_data, write_results
from labelwise.config import TrainConfig, load_config
from labelwise.engine.runtime import resolve_device
from labelwise.methods import supervised
from labelwise.models.export import load_model


def parse_args(description: str, default_config: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=default_config, help="training config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _gpu for a separate GPU row set")
    parser.add_argument("--resume", action="store_true", help="resume an interrupted benchmark run")
    parser.add_argument("--eval-only", action="store_true", help="re-evaluate the finished run, do not train")
    parser.add_argument("--method", default=None, help="row label (default: the model name)")
    parser.add_argument("--run-name", default=None, help="run folder under benchmarks/runs (default: the benchmark "
                                                         "name, plus _<method> for models other than the default "
                                                         "and _<encoder>_<weights> for encoder models)")
    return parser.parse_args()


def run(name: str, method: str, dataset: str, data_dir: str, description: str, default_config: str) -> None:
    args = parse_args(description, default_config)
    default_method = method
    root = require_data(data_dir)
    method = args.method or method
    config: TrainConfig = load_config(TrainConfig, ROOT / args.config, [f"data.root={root}", *args.overrides])
    encoder = config.model.options.get("encoder") or "none"
    weights = "none" if encoder == "none" else (config.model.options.get("encoder_weights", "imagenet") or "random")
    run_name = args.run_name or (name + args.suffix + ("" if method == default_method else f"_{method}")
                                 + ("" if encoder == "none" else f"_{encoder}_{weights}"))
    run_dir = ROOT / "benchmarks" / "runs" / run_name
    config.run_dir = str(run_dir)
    extra = {}
    if args.eval_only:
        previous = RESULTS / f"{name}{args.suffix}.json"
        if previous.exists():
            extra["train_commit"] = json.loads(previous.read_text())["commit"]
    else:
        supervised.train(config, resume=args.resume, overwrite=not args.resume)
    plain = json.loads((run_dir / "eval.json").read_text())
    eval_config = load_model(run_dir).eval_config
    flipped = supervised.evaluate(run_dir, config, device=config.device, precision=config.precision,
                                  eval_config=replace(eval_config, flip=True)).to_dict(list(plain["per_class_iou"]))
    split = config.data.val_split if config.data.dataset != "aerial" else "tiles " + ",".join(map(str, config.data.val_tiles))
    rows = []
    for label, metrics in (("single", plain), ("flip", flipped)):
        rows.append({
            "method": method, "encoder": encoder, "encoder_weights": weights,
            "dataset": dataset, "split": split, "eval": label,
            "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"], "mean_acc": metrics.get("mean_acc"),
            "per_class_iou": metrics["per_class_iou"],
            "train_seconds": round(plain["train_seconds"], 1), "images_per_second": round(plain["images_per_second"], 2),
            "precision": config.precision, "steps": config.total_steps, "config": args.config,
        })
    for row in rows:
        row.update(commit=extra.get("train_commit", START_COMMIT), command=command_line())
    write_results(name, merge_rows(name + args.suffix, rows), resolve_device(config.device), extra=extra,
                  suffix=args.suffix)


def merge_rows(results_name: str, rows: list[dict]) -> list[dict]:
    """Earlier rows of ``results/<results_name>.json`` with ``rows`` replacing those of the same
    method, encoder, weights and eval (rows from before encoders existed get ``none`` / ``none``)."""
    path = RESULTS / f"{results_name}.json"
    if not path.exists():
        return rows
    earlier = json.loads(path.read_text())
    kept = []
    for row in earlier.get("rows", []):
        row.setdefault("encoder", "none")
        row.setdefault("encoder_weights", "none")
        row.setdefault("commit", earlier.get("train_commit", earlier.get("commit")))
        row.setdefault("command", earlier.get("command"))
        key = (row["method"], row["encoder"], row["encoder_weights"], row.get("eval"))
        if key not in {(r["method"], r["encoder"], r["encoder_weights"], r["eval"]) for r in rows}:
            kept.append(row)
    return kept + rows
