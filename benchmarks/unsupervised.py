"""Benchmark unsupervised_<dataset>: k-means, STEGO, PiCIE-style and HP (ablations) heads on the frozen default ViT.

Run from the project root:
`.venv/bin/python benchmarks/unsupervised.py --dataset camvid` (also `aerial`, `synthetic`).
The recipe is `configs/unsupervised_<dataset>.yaml`; every row uses the same backbone (the
project's pretrained ViT, `src/labelwise/weights/labelwise_vit.safetensors`, rebuilt with
`benchmarks/pretrain_dino.py` when missing) and the same training budget (the config's steps and
batch), except `kmeans`, which trains nothing. `--random-floor` adds `hp_full` on the same ViT at
random initialisation (the floor). Rows (one with and one without dense CRF per method):
`method` (kmeans, stego, picie, hp_ag, hp_ag_sp, hp_full), `backbone`, `crf`, `miou` and
`pixel_acc` of the cluster probe (Hungarian-matched over the whole split), `linear_miou`
(linear probe trained on the train split's labels: a feature-quality number only),
`selection` (the label-free rule: the final checkpoint), `train_seconds`.

Labels of the reported split are used for scoring only; the training split's labels only for
the linear probe. Runs are resumable (`benchmarks/runs/unsupervised_<dataset>/<row>/`); the
results file is rewritten after every method, so an interrupted benchmark keeps its rows.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import ROOT, ensure_default_backbone, random_backbone, require_data, write_results
from labelwise.config import load_config
from labelwise.engine.runtime import resolve_device
from labelwise.methods import unsupervised
from labelwise.models.artifact import is_artifact

#: row name -> config overrides
METHOD_ROWS: dict[str, list[str]] = {
    "kmeans": ["method=kmeans"],
    "stego": ["method=stego"],
    "picie": ["method=picie"],
    "hp_ag": ["method=hp", "hp.task_specific=false", "hp.local=false"],
    "hp_ag_sp": ["method=hp", "hp.task_specific=true", "hp.local=false"],
    "hp_full": ["method=hp", "hp.task_specific=true", "hp.local=true"],
}
DATA = {"camvid": "camvid", "aerial": "dubai_aerial", "synthetic": None}


def result_rows(name: str, backbone: str, report: dict[str, Any], summary: dict[str, Any], dataset: str
                ) -> list[dict[str, Any]]:
    rows = []
    for crf, scores in ((False, report), (True, report.get("crf"))):
        if scores is None:
            continue
        rows.append({
            "method": name, "dataset": dataset, "split": "val", "backbone": backbone, "crf": crf,
            "miou": round(scores["miou"], 4), "pixel_acc": round(scores["pixel_acc"], 4),
            "per_class_iou": {k: (None if v is None else round(v, 4)) for k, v in scores["per_class_iou"].items()},
            "linear_miou": None if report.get("linear_miou") is None else round(report["linear_miou"], 4),
            "selection": report.get("selection"), "clusters": report.get("clusters"),
            "train_seconds": summary.get("train_seconds"), "cache_seconds": summary.get("cache_seconds"),
            "steps": summary.get("steps"),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATA), default="camvid", help="which benchmark")
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_ROWS), default=list(METHOD_ROWS),
                        help="rows to run")
    parser.add_argument("--random-floor", action=argparse.BooleanOptionalAction, default=True,
                        help="add hp_full on a random-init ViT")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every row (e.g. --set stages.0.steps=100)")
    parser.add_argument("--no-rebuild", action="store_true", help="do not rebuild a missing default backbone")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _quick")
    args = parser.parse_args()
    data_name = DATA[args.dataset]
    data_root = require_data(data_name) if data_name else None
    backbone = ensure_default_backbone(rebuild=not args.no_rebuild)
    if backbone is None:
        raise SystemExit("the default backbone is missing and --no-rebuild was given")
    runs = ROOT / "benchmarks" / "runs" / f"unsupervised_{args.dataset}{args.suffix}"
    plan = [(name, "pretrained", backbone) for name in args.methods]
    if args.random_floor:
        plan.append(("hp_full", "random", random_backbone(backbone, runs)))
    config_path = ROOT / "configs" / f"unsupervised_{args.dataset}.yaml"
    rows: list[dict[str, Any]] = []
    device = None
    for name, kind, weights in plan:
        run_dir = runs / f"{name}_{kind}"
        overrides = [*METHOD_ROWS[name], f"features.backbone={weights}", f"run_dir={run_dir}", "progress=false",
                     *args.overrides]
        if data_root is not None:
            overrides.append(f"data.root={data_root}")
        config = load_config(unsupervised.UnsupervisedConfig, config_path, overrides)
        device = resolve_device(config.device)
        start = time.perf_counter()
        finished = is_artifact(run_dir)
        if not finished:
            checkpoints = run_dir / "checkpoints"
            resume = checkpoints.is_dir() and any(checkpoints.iterdir())
            unsupervised.train(config, resume=resume)
        summary = unsupervised.load_head(run_dir).summary
        report = unsupervised.probe(run_dir, config)
        rows.extend(result_rows(name, kind, report, summary, args.dataset))
        print(f"{name} ({kind}): miou {report['miou']:.4f}, crf {report.get('crf', {}).get('miou')}, "
              f"linear {report.get('linear_miou')}, {time.perf_counter() - start:.0f} s", flush=True)
        write_results(f"unsupervised_{args.dataset}", rows, device,
                      extra={"config": str(config_path.relative_to(ROOT)), "overrides": args.overrides,
                             "selection_rule": unsupervised.SELECTION_RULE}, suffix=args.suffix)


if __name__ == "__main__":
    main()
