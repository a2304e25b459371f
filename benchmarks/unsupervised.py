"""Benchmark unsupervised_<dataset>: label-free segmentation on frozen features, with and without refinement.

Run from the project root:
`.venv/bin/python benchmarks/unsupervised.py --dataset camvid` (also `aerial`, `synthetic`).
The recipe is `configs/unsupervised_<dataset>.yaml`; every row of one backbone uses the same
training budget (the config's steps and batch), except `kmeans` and `primaps`, which train no
head. `--backbones` lists `features.backbone` values (default the project's pretrained ViT,
`src/labelwise/weights/labelwise_vit.safetensors`, rebuilt with `benchmarks/pretrain_dino.py`
when missing; also `mobilenet_v2_imagenet` and joined backbones such as
`labelwise_default+mobilenet_v2_imagenet`). `--random-floor` adds `hp_full` on the same ViT at
random initialisation (the floor). `--refine ROW ...` also refines those rows by self-training
(`labelwise unsupervised refine`: a U-Net on the ImageNet MobileNetV2 encoder trained on the
run's confident cluster predictions of the training images) and scores the refined model.

Rows (one with and one without dense CRF each): `method` (kmeans, primaps, stego, picie, hp_ag,
hp_ag_sp, hp_full and their `_agreeing` / `_guard` variants), `backbone` (the weights' name:
`labelwise_vit`, `mobilenet_v2_imagenet`, joined with `+`, or `random`), `refine`, `crf`, `miou`
and `pixel_acc` (Hungarian-matched over the whole split), `linear_miou` (linear probe on the
train split's labels: a feature-quality number only, cluster rows only), `selection` (the
label-free rule: the final checkpoint), `total_cpu_minutes` (feature extraction + head training
or prototype fitting + refinement, as first computed; seconds also given apart).

Labels of the reported split are used for scoring only; the training split's labels only for
the linear probe and the pseudo-label diagnostic of refinement. Runs are resumable
(`benchmarks/runs/unsupervised_<dataset>/<row>/`); the results file is rewritten after every
row, so an interrupted benchmark keeps its rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _common import ROOT, ensure_default_backbone, random_backbone, require_data, write_results
from labelwise.config import load_config
from labelwise.data.build import build_eval_dataset
from labelwise.engine.runtime import resolve_device
from labelwise.inference import evaluate, load
from labelwise.io.checkpoint import has_checkpoint
from labelwise.methods import unsupervised
from labelwise.models.artifact import is_artifact

#: row name -> config overrides
METHOD_ROWS: dict[str, list[str]] = {
    "kmeans": ["method=kmeans"],
    "stego": ["method=stego"],
    "picie": ["method=picie"],
    "hp_ag": ["method=hp", "hp.task_specific=false", "hp.local=false"],
    "hp_ag_sp": ["method=hp", "hp.task_specific=true", "hp.local=false", "hp.specific_positives=all"],
    "hp_full": ["method=hp", "hp.task_specific=true", "hp.local=true", "hp.specific_positives=all"],
    "primaps": ["method=primaps"],
    "hp_ag_sp_agreeing": ["method=hp", "hp.task_specific=true", "hp.local=false", "hp.specific_positives=agreeing"],
    "hp_full_agreeing": ["method=hp", "hp.task_specific=true", "hp.local=true", "hp.specific_positives=agreeing"],
    "hp_full_guard": ["method=hp", "hp.task_specific=true", "hp.local=true", "hp.collapse_guard=0.9"],
}
DATA = {"camvid": "camvid", "aerial": "dubai_aerial", "synthetic": None}


def backbone_label(spec: str) -> str:
    """The weights' name a row reports: the default ViT is ``labelwise_vit``."""
    return "+".join("labelwise_vit" if part in ("labelwise_default", "labelwise_vit") else part
                    for part in spec.split("+"))


def result_rows(name: str, backbone: str, report: dict[str, Any], summary: dict[str, Any], dataset: str,
                refined: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of one trained run (``refined``: the refine record, the scores being the refined model's)."""
    rows = []
    feature_seconds = float(summary.get("feature_extract_seconds") or summary.get("cache_seconds") or 0.0)
    # head training or prototype fitting, plus the centroids' k-means on the training codes
    train_seconds = float(summary.get("train_seconds") or 0.0) + float(summary.get("centroid_seconds") or 0.0)
    refine_seconds = float(refined["seconds"]) if refined else 0.0
    for crf, scores in ((False, report), (True, report.get("crf"))):
        if scores is None:
            continue
        rows.append({
            "method": name, "dataset": dataset, "split": "val", "backbone": backbone, "refine": refined is not None,
            "crf": crf, "miou": round(scores["miou"], 4), "pixel_acc": round(scores["pixel_acc"], 4),
            "per_class_iou": {k: (None if v is None else round(v, 4)) for k, v in scores["per_class_iou"].items()},
            "linear_miou": None if report.get("linear_miou") is None else round(report["linear_miou"], 4),
            "selection": report.get("selection") or unsupervised.SELECTION_RULE, "clusters": report.get("clusters"),
            "total_cpu_minutes": round((feature_seconds + train_seconds + refine_seconds) / 60, 2),
            "feature_seconds": round(feature_seconds, 1), "train_seconds": round(train_seconds, 1),
            "refine_seconds": round(refine_seconds, 1), "steps": summary.get("steps"),
            **({"refine_record": refined["record"]} if refined else {}),
        })
    return rows


def refined_report(run_dir: Path, config: unsupervised.UnsupervisedConfig, refine_overrides: list[str],
                   crf: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Refine the run (resumable) and score the refined model on the val split as loaded
    (Hungarian over the split), with and without CRF."""
    from labelwise.methods.unsupervised.refine import RefineConfig, refine

    settings = load_config(RefineConfig, None, [f"out_dir={run_dir / 'refine'}", "progress=false",
                                                *refine_overrides])
    result = refine(run_dir, settings, resume=True)
    dataset, _ = build_eval_dataset(config.data)
    predictor = load(result.final_model, config.device)
    report: dict[str, Any] = evaluate(predictor, dataset)
    if crf:
        report["crf"] = evaluate(predictor, dataset, crf=True)
    report["selection"] = unsupervised.SELECTION_RULE
    record = {key: result.summary.get(key) for key in ("rounds", "keep_fraction", "crf", "pseudo_label_miou",
                                                      "teacher_miou")}
    seconds = sum(float(result.summary.get(key) or 0.0) for key in ("train_seconds", "pseudo_label_seconds"))
    return report, {"seconds": seconds, "record": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATA), default="camvid", help="which benchmark")
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_ROWS), default=list(METHOD_ROWS)[:6],
                        help="rows to run")
    parser.add_argument("--backbones", nargs="+", default=["labelwise_default"],
                        help="features.backbone of the rows (each method runs on each)")
    parser.add_argument("--refine", nargs="*", default=[], choices=list(METHOD_ROWS),
                        help="rows also refined by self-training")
    parser.add_argument("--refine-set", dest="refine_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="RefineConfig override (e.g. --refine-set steps=600)")
    parser.add_argument("--random-floor", action=argparse.BooleanOptionalAction, default=False,
                        help="add hp_full on a random-init ViT")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every row (e.g. --set stages.0.steps=100)")
    parser.add_argument("--no-rebuild", action="store_true", help="do not rebuild a missing default backbone")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _quick")
    parser.add_argument("--runs", default=None, help="run folder group under benchmarks/runs (default: "
                        "unsupervised_<dataset><suffix>); rows already trained there are reused")
    args = parser.parse_args()
    data_name = DATA[args.dataset]
    data_root = require_data(data_name) if data_name else None
    if ensure_default_backbone(rebuild=not args.no_rebuild) is None:
        raise SystemExit("the default backbone is missing and --no-rebuild was given")
    runs = ROOT / "benchmarks" / "runs" / (args.runs or f"unsupervised_{args.dataset}{args.suffix}")
    plan = [(name, backbone_label(spec), spec) for spec in args.backbones for name in args.methods]
    if args.random_floor:
        plan.append(("hp_full", "random", str(random_backbone(ensure_default_backbone(False), runs))))
    config_path = ROOT / "configs" / f"unsupervised_{args.dataset}.yaml"
    rows: list[dict[str, Any]] = []
    device = None
    for name, label, spec in plan:
        run_dir = runs / f"{name}_{label.replace('+', '_')}"
        overrides = [*METHOD_ROWS[name], f"features.backbone={spec}", f"run_dir={run_dir}", "progress=false",
                     *args.overrides]
        if data_root is not None:
            overrides.append(f"data.root={data_root}")
        config = load_config(unsupervised.UnsupervisedConfig, config_path, overrides)
        device = resolve_device(config.device)
        start = time.perf_counter()
        if not is_artifact(run_dir):
            unsupervised.train(config, resume=has_checkpoint(run_dir))
        summary = unsupervised.load_head(run_dir).summary
        report = unsupervised.probe(run_dir, config)
        rows.extend(result_rows(name, label, report, summary, args.dataset))
        print(f"{name} ({label}): miou {report['miou']:.4f}, crf {report.get('crf', {}).get('miou')}, "
              f"linear {report.get('linear_miou')}, {time.perf_counter() - start:.0f} s", flush=True)
        if name in args.refine:
            refined, record = refined_report(run_dir, config, args.refine_overrides, config.eval.crf)
            rows.extend(result_rows(name, label, refined, summary, args.dataset, record))
            print(f"{name} ({label}) refined: miou {refined['miou']:.4f}, crf {refined.get('crf', {}).get('miou')}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        write_results(f"unsupervised_{args.dataset}", rows, device,
                      extra={"config": str(config_path.relative_to(ROOT)), "overrides": args.overrides,
                             "refine_overrides": args.refine_overrides,
                             "selection_rule": unsupervised.SELECTION_RULE}, suffix=args.suffix)


if __name__ == "__main__":
    main()
