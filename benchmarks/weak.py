"""Benchmark weak_<dataset>: weak supervision from image-level tags derived from the training
masks.

Run from the project root: `.venv/bin/python benchmarks/weak.py --dataset synthetic` (recipe
`configs/weak_<dataset>.yaml`). `--methods` picks the classifiers (`mct_vit`, the multi-class-token
ViT on the project's pretrained ViT, rebuilt with `benchmarks/pretrain_dino.py` when missing;
`cnn_cam`, CAMs of the ImageNet MobileNetV2; `hybrid`, the class-token Transformer on its
features) and `--refine` the CAM refinements (`none`, `par`); with `--random-floor` (default on)
`mct_vit` also runs on the same ViT at random initialisation. Rows: `stage` `cams` (and
`cams_refined` with PAR) and `pseudo_masks` (scored on the training images whose tags were used;
pseudo-masks on the pixels they keep, with `kept_fraction`) and `final` (the segmenter trained on
the pseudo-masks, scored on the validation split), each with `method`, `encoder` (the pretrained
weights the classifier starts from), `refine`, `split`, `backbone`, `miou`, `pixel_acc` and
`self_training_round` (0; with `--set self_training.rounds=R`, rounds 1..R add a `pseudo_masks` row, the
segmenter's confident tag-restricted labels of the training images, and a `final` row each). Runs resume in
`benchmarks/runs/weak_<dataset><suffix>/<row>/`.
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
#: the pretrained weights each classifier starts from (the rows' ``encoder``)
ENCODER = {"mct_vit": "labelwise_vit", "cnn_cam": "mobilenet_v2_imagenet",
           "hybrid": "labelwise_vit+mobilenet_v2_imagenet"}


def rows_of(report: dict[str, Any], backbone: str, dataset: str, train_split: str, val_split: str, seconds: float,
            method: str = "mct_vit", encoder: str = "labelwise_vit", refine: str = "none") -> list[dict[str, Any]]:
    rows = []
    stages = [("cams", train_split, report["pseudo_masks"].get("cams"), 0),
              ("cams_refined", train_split, report["pseudo_masks"].get("cams_refined"), 0),
              ("pseudo_masks", train_split, report["pseudo_masks"].get("pseudo_masks"), 0),
              ("final", val_split, report.get("final"), 0)]
    for record in report.get("self_training") or []:
        pseudo = record["pseudo_labels"].get("pseudo_labels")
        if pseudo is not None:
            pseudo = {**pseudo, "kept_fraction": record["pseudo_labels"]["kept_fraction"]}
        stages += [("pseudo_masks", train_split, pseudo, record["round"]),
                   ("final", val_split, record.get("final"), record["round"])]
    for stage, split, scores, round_ in stages:
        if scores is None:
            continue
        row = {"method": method, "stage": stage, "self_training_round": round_, "encoder": encoder,
               "refine": refine, "dataset": dataset, "split": split, "backbone": backbone,
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
    parser.add_argument("--methods", nargs="+", choices=sorted(ENCODER), default=["mct_vit"],
                        help="classifiers to run")
    parser.add_argument("--refine", nargs="+", choices=["none", "par"], default=["none"],
                        help="CAM refinements (pseudo_masks.refine) to run for each method")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override")
    parser.add_argument("--suffix", default="",
                        help="results file suffix (weak_<dataset><suffix>.json), so a run of other methods keeps "
                             "the earlier file")
    args = parser.parse_args()
    data_root = require_data(DATA[args.dataset]) if DATA[args.dataset] else None
    backbone = ensure_default_backbone()
    runs = ROOT / "benchmarks" / "runs" / f"weak_{args.dataset}{args.suffix}"
    # (row folder, backbone label, ViT weights, method, refine); the earlier rows keep their folders
    plan = [(("pretrained" if method == "mct_vit" else method) + ("" if refine == "none" else f"_{refine}"),
             "pretrained", backbone, method, refine) for method in args.methods for refine in args.refine]
    if args.random_floor and "mct_vit" in args.methods:
        plan.append(("random", "random", random_backbone(backbone, runs), "mct_vit", "none"))
    config_path = ROOT / "configs" / f"weak_{args.dataset}.yaml"
    rows: list[dict[str, Any]] = []
    device = None
    for folder, kind, weights, method, refine in plan:
        overrides = [f"backbone={weights}", f"run_dir={runs / folder}", f"method={method}",
                     f"pseudo_masks.refine={refine}", *args.overrides]
        if data_root is not None:
            overrides.append(f"data.root={data_root}")
        config = load_config(weak.WeakConfig, config_path, overrides)
        device = resolve_device(config.device)
        start = time.perf_counter()
        report_path = runs / folder / "weak_run.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else weak.run(config, resume=True)
        new = rows_of(report, kind, args.dataset, config.data.train_split, config.data.val_split,
                      time.perf_counter() - start, method, "random" if kind == "random" else ENCODER[method], refine)
        rows.extend(new)
        print(f"{folder}: " + ", ".join(f"{r['stage']} (round {r['self_training_round']}) {r['miou']:.4f}"
                                        for r in new), flush=True)
        write_results(f"weak_{args.dataset}", rows, device, extra={"config": str(config_path.relative_to(ROOT)),
                                                                   "overrides": args.overrides},
                      suffix=args.suffix)


if __name__ == "__main__":
    main()
