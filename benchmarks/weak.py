"""Benchmark weak_<dataset>: MCTformer weak supervision from image-level tags derived from the
training masks.

Run from the project root: `.venv/bin/python benchmarks/weak.py --dataset synthetic` (recipe
`configs/weak_<dataset>.yaml`). Rows for the project's pretrained ViT (rebuilt with
`benchmarks/pretrain_dino.py` when missing) and, with `--random-floor` (default on), the same
architecture at random initialisation: `stage` `cams` and `pseudo_masks` (scored on the training
images whose tags were used; pseudo-masks on the pixels they keep, with `kept_fraction`) and
`final` (the segmenter trained on the pseudo-masks, scored on the validation split), each with
`split`, `backbone`, `miou`, `pixel_acc`. Runs resume in `benchmarks/runs/weak_<dataset>/`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from _common import ROOT, ensure_default_backbone, random_backbone, require_data, write_results
from labelwise.config import load_config
from labelwise.engine.runtime import resolve_device
from labelwise.methods import weak

DATA = {"camvid": "camvid", "aerial": "dubai_aerial", "synthetic": None}


def rows_of(report: dict[str, Any], backbone: str, dataset: str, train_split: str, val_split: str, seconds: float
            ) -> list[dict[str, Any]]:
    rows = []
    for stage, split, scores in (("cams", train_split, report["pseudo_masks"].get("cams")),
                                 ("pseudo_masks", train_split, report["pseudo_masks"].get("pseudo_masks")),
                                 ("final", val_split, report.get("final"))):
        if scores is None:
            continue
        row = {"stage": stage, "dataset": dataset, "split": split, "backbone": backbone,
               "miou": round(scores["miou"], 4), "pixel_acc": round(scores["pixel_acc"], 4),
               "per_class_iou": {k: (None if v is None else round(v, 4)) for k, v in scores["per_class_iou"].items()},
               "total_seconds": round(seconds, 1)}
        if "kept_fraction" in scores:
            row["kept_fraction"] = round(scores["kept_fraction"], 4)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATA), default="synthetic", help="which benchmark")
    parser.add_argument("--random-floor", action=argparse.BooleanOptionalAction, default=True,
                        help="add the random-init backbone rows")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override")
    args = parser.parse_args()
    data_root = require_data(DATA[args.dataset]) if DATA[args.dataset] else None
    backbone = ensure_default_backbone()
    runs = ROOT / "benchmarks" / "runs" / f"weak_{args.dataset}"
    plan = [("pretrained", backbone)]
    if args.random_floor:
        plan.append(("random", random_backbone(backbone, runs)))
    config_path = ROOT / "configs" / f"weak_{args.dataset}.yaml"
    rows: list[dict[str, Any]] = []
    device = None
    for kind, weights in plan:
        overrides = [f"backbone={weights}", f"run_dir={runs / kind}", *args.overrides]
        if data_root is not None:
            overrides.append(f"data.root={data_root}")
        config = load_config(weak.WeakConfig, config_path, overrides)
        device = resolve_device(config.device)
        start = time.perf_counter()
        report_path = runs / kind / "weak_run.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else weak.run(config, resume=True)
        rows.extend(rows_of(report, kind, args.dataset, config.data.train_split, config.data.val_split,
                            time.perf_counter() - start))
        print(f"{kind}: " + ", ".join(f"{r['stage']} {r['miou']:.4f}" for r in rows if r["backbone"] == kind),
              flush=True)
        write_results(f"weak_{args.dataset}", rows, device, extra={"config": str(config_path.relative_to(ROOT)),
                                                                   "overrides": args.overrides})


if __name__ == "__main__":
    main()
