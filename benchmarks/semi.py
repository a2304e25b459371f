"""Benchmark semi_<dataset>: semi-supervised methods at several labeled fractions.

Run from the project root: `.venv/bin/python benchmarks/semi.py --dataset camvid [--fractions 0.0625 0.125 0.25]
[--methods supervised_only fixmatch unimatch self_training] [--ssl-init PATH]`. Recipe:
`configs/semi_<dataset>.yaml` (the same step budget for every row of a fraction). For CamVid each
fraction's labeled subset is drawn from `camvid/train` by `labelwise.data.splits` (seed 0; the
subsets of one seed are nested) and the rest of `camvid/train` is the unlabeled part; scores are
on `camvid/val`. For aerial, tile 1 is labeled, tiles 2-5 are unlabeled crops, tiles 6-7 are
scored. `--ssl-init` adds `<method>+ssl` rows (the encoder initialised from that self-supervised
checkpoint) for the methods given with `--ssl-methods`; `--methods` with no names runs only those.
Every row is a resumable run in `benchmarks/runs/semi_<dataset>/<fraction>/<method>/`; finished
runs are read back, not retrained.
`--split-seed S` (CamVid's draw of the labeled subset) and `--seed T` (training: init, batches,
augmentation) measure the spread of a row: any non-zero seed puts the runs under
`benchmarks/runs/semi_<dataset>/split<S>_seed<T>/` and the rows in
`results/semi_<dataset>_split<S>_seed<T>.json`.
Self-training's round 0 is that fraction's `supervised_only` run (`semi.teacher`); its row's
`train_seconds` and `steps` count the teacher's training too.
`--config configs/semi_camvid_mobilenet_v2.yaml` runs the same plan on the ImageNet MobileNetV2
U-Net (runs under `benchmarks/runs/semi_<dataset>/mobilenet_v2_imagenet/`).
Rows: `fraction`, `labeled_images`, `method`, `encoder`, `encoder_weights`, `miou`, `pixel_acc`, `train_seconds`, `steps`, and the
`commit` / `command` / `date` of the invocation that trained them. The results file keeps the rows
of earlier invocations: a new row replaces the one with the same fraction, method and seeds, so rows can be
(re)measured a few at a time (`--methods`, `--fractions`) when runs do not survive between sessions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from _common import RESULTS, ROOT, START_COMMIT, require_data, write_results
from labelwise.config import load_config
from labelwise.data.build import build_datasets
from labelwise.data.splits import dataset_names, split_labeled, write_split
from labelwise.engine.runtime import resolve_device
from labelwise.methods import semi
from labelwise.models.artifact import is_artifact

DATA = {"camvid": "camvid", "aerial": "dubai_aerial"}


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two rows the same measurement: fraction, method, encoder and weights, both seeds."""
    return (row["fraction"], row["method"], row.get("encoder", "none"), row.get("encoder_weights", "none"),
            row.get("split_seed", 0), row.get("seed", 0))


def merge_rows(earlier: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``earlier`` with each row that ``new`` re-measures replaced in place, then the other new rows."""
    fresh = {row_key(row): row for row in new}
    merged = [fresh.pop(row_key(row), row) for row in earlier]
    return merged + [row for row in new if row_key(row) in fresh]


def run_row(config_path: Path, overrides: list[str], run_dir: Path) -> tuple[dict[str, Any], bool]:
    """Train (or read back) one row's run; its eval.json and whether this call trained (part of) it."""
    done = run_dir / "eval.json"
    if done.is_file() and is_artifact(run_dir):
        return json.loads(done.read_text()), False
    config = load_config(semi.SemiConfig, config_path, [*overrides, f"run_dir={run_dir}"])
    resume = (run_dir / "checkpoints").is_dir() or (run_dir / "round0").is_dir()
    result = semi.train(config, resume=resume)
    return result.metrics or json.loads(done.read_text()), True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATA), default="camvid")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0625, 0.125, 0.25])
    parser.add_argument("--methods", nargs="*", default=list(semi.METHODS), choices=list(semi.METHODS))
    parser.add_argument("--ssl-init", type=Path, default=None, help="self-supervised encoder checkpoint")
    parser.add_argument("--ssl-methods", nargs="+", default=["unimatch"], choices=list(semi.METHODS))
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the labeled subset's draw (CamVid)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, batches, augmentation)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--config", type=Path, default=None,
                        help="recipe (default: configs/semi_<dataset>.yaml; e.g. configs/semi_camvid_mobilenet_v2.yaml "
                             "for the ImageNet-encoder rows, whose runs go under runs/semi_<dataset>/<encoder>_<weights>/)")
    args = parser.parse_args()
    data_root = require_data(DATA[args.dataset])
    config_path = ROOT / (args.config or Path("configs") / f"semi_{args.dataset}.yaml")
    bench = f"semi_{args.dataset}"
    runs = ROOT / "benchmarks" / "runs" / bench
    recipe = load_config(semi.SemiConfig, config_path, [f"data.root={data_root}", *args.overrides,
                                                         "semi.method=supervised_only"])
    encoder = recipe.model.options.get("encoder") or "none"
    encoder_weights = "none" if encoder == "none" else (recipe.model.options.get("encoder_weights", "imagenet")
                                                        or "random")
    if encoder != "none":
        runs = runs / f"{encoder}_{encoder_weights}"
    if args.split_seed or args.seed:
        runs = runs / f"split{args.split_seed}_seed{args.seed}"
        bench = f"{bench}_split{args.split_seed}_seed{args.seed}"
    base = [f"data.root={data_root}", f"seed={args.seed}", *args.overrides]
    rows: list[dict[str, Any]] = []
    previous = RESULTS / f"{bench}.json"
    earlier = json.loads(previous.read_text())["rows"] if previous.is_file() else []
    command = " ".join(["python", "benchmarks/semi.py", *sys.argv[1:]])
    device = resolve_device(load_config(semi.SemiConfig, config_path, [*base, "semi.method=supervised_only"]).device)
    plan: list[tuple[float, str, list[str]]] = []
    if args.dataset == "camvid":
        probe = load_config(semi.SemiConfig, config_path, [*base, "semi.method=supervised_only"])
        names = dataset_names(build_datasets(probe.data).train_source)
        for fraction in args.fractions:
            split = split_labeled(names, fraction=fraction, seed=args.split_seed)
            labeled, unlabeled = write_split(runs / f"{fraction:g}" / "split", split)
            split_overrides = [f"data.train_list={labeled}", f"semi.unlabeled_list={unlabeled}"]
            plan += [(fraction, m, split_overrides) for m in args.methods]
            if args.ssl_init:
                plan += [(fraction, f"{m}+ssl", split_overrides) for m in args.ssl_methods]
    else:
        fraction = 1 / 5  # one of the five training tiles
        tiles = ["data.train_tiles=[1]", "semi.unlabeled_tiles=[2, 3, 4, 5]"]
        plan += [(fraction, m, tiles) for m in args.methods]
        if args.ssl_init:
            plan += [(fraction, f"{m}+ssl", tiles) for m in args.ssl_methods]
    for fraction, name, split_overrides in plan:
        method = name.removesuffix("+ssl")
        shared = [*base, *split_overrides, *([f"model.init={args.ssl_init}"] if name.endswith("+ssl") else [])]
        overrides = [*shared, f"semi.method={method}"]
        if method == "self_training":
            # round 0 is the supervised_only run of the same subset and init (trained here if missing)
            teacher = runs / f"{fraction:g}" / name.replace("self_training", "supervised_only")
            run_row(config_path, [*shared, "semi.method=supervised_only"], teacher)
            overrides.append(f"semi.teacher={teacher}")
        metrics, trained = run_row(config_path, overrides, runs / f"{fraction:g}" / name)
        key = (fraction, name, encoder, encoder_weights, args.split_seed if args.dataset == "camvid" else None,
               args.seed)
        if not trained and any(row_key(row) == key for row in earlier):
            continue  # a run read back keeps the row (and commit) recorded when it was trained
        config = load_config(semi.SemiConfig, config_path, overrides)
        labeled_images = len(build_datasets(config.data).train_source)  # type: ignore[arg-type]
        rows.append({"dataset": args.dataset, "split": config.data.val_split, "fraction": fraction,
                     "split_seed": args.split_seed if args.dataset == "camvid" else None, "seed": args.seed,
                     "labeled_images": labeled_images, "method": name, "encoder": encoder,
                     "encoder_weights": encoder_weights, "miou": round(metrics["miou"], 4),
                     "pixel_acc": round(metrics["pixel_acc"], 4), "train_seconds": round(metrics.get("train_seconds", 0), 1),
                     "steps": config.total_steps * (config.semi.rounds + 1 if method == "self_training" else 1),
                     "per_class_iou": {k: (None if v is None else round(v, 4))
                                       for k, v in metrics.get("per_class_iou", {}).items()},
                     "commit": START_COMMIT, "command": command, "date": datetime.date.today().isoformat()})
        print(f"{fraction:g} {name}: {rows[-1]['miou']:.4f}", flush=True)
        write_results(bench, merge_rows(earlier, rows), device,
                      extra={"config": str(config_path.relative_to(ROOT)), "overrides": args.overrides})


if __name__ == "__main__":
    main()
