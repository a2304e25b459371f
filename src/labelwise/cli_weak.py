"""``labelwise weak train | cams | pseudo-masks | run``: argument parsing over
:mod:`labelwise.methods.weak` (kept apart from ``cli.py`` so each file stays short)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from labelwise.cli_options import HelpFormatter, add, add_run_options, config_overrides
from labelwise.cli_report import report_after_training


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    add(parser, "set")
    add(parser, "images", help="folders of training images (default: the config's images, or its data training "
                               "split with tags derived from its masks)")
    parser.add_argument("--tags", type=Path, default=None,
                        help="tag file for --images: CSV 'image,tags' (tags separated by ';') or JSON "
                             "{image: [class, ...]}")
    parser.add_argument("--classes", type=Path, default=None,
                        help="classes.json naming the classes of the tag file (sets data.class_map)")


def add_weak(commands) -> None:  # noqa: ANN001 - argparse's private subparsers action
    parser = commands.add_parser(
        "weak", help="weak supervision from image-level tags (MCTformer, CNN CAMs, hybrid): classifier, CAMs, "
        "pseudo-masks", formatter_class=HelpFormatter, description="Train a classifier on image tags (a "
        "multi-class-token ViT, a CNN with class activation maps, or the hybrid: a Transformer on a pretrained "
        "CNN's features), then turn its class activation maps into pseudo-masks that `labelwise train` can learn "
        "from.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train the classifier on image tags",
                           formatter_class=HelpFormatter)
    run = sub.add_parser("run", help="every stage: classifier, pseudo-masks, segmenter trained on them, and "
                         "its score on the data's validation split when the data is labeled",
                         formatter_class=HelpFormatter)
    for stage in (train, run):
        add_run_options(stage, "config", "run_dir", "resume", "overwrite", "device", "precision", "report")
        _add_data_options(stage)
        add(stage, "method", choices=("mct_vit", "cnn_cam", "hybrid"),
            help="classifier: mct_vit (multi-class-token ViT), cnn_cam (CNN + pooled classifier) or hybrid "
                 "(class-token Transformer on CNN features); default: the config's method")
        add(stage, "backbone")
        add(stage, "steps", help="classifier training steps (default: the config's stages.0.steps)")
    for action, text in (("cams", "write each tagged class's activation map of every training image (PNG)"),
                         ("pseudo-masks", "write pseudo-masks of every training image as a labelwise folder "
                                          "dataset (and the CAM PNGs)")):
        stage = sub.add_parser(action, help=text, formatter_class=HelpFormatter)
        add(stage, "model", help="run folder of `labelwise weak train`")
        _add_data_options(stage)
        add(stage, "device")
        add(stage, "precision")
        add(stage, "out", help="output folder (default: MODEL/cams or MODEL/pseudo_masks)")
        stage.add_argument("--batch-size", type=int, default=8, help="images per forward (same-size images only)")


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = config_overrides(args)
    for key, value in (("tags", args.tags), ("data.class_map", args.classes)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(str(value))}")
    return overrides


def run_weak(args: argparse.Namespace) -> int:
    from labelwise.config import load_config
    from labelwise.methods import weak

    if args.action == "train":
        config = load_config(weak.WeakConfig, args.config, _overrides(args))
        result = weak.train_classifier(config, resume=args.resume, overwrite=args.overwrite)
        print(json.dumps({"run_dir": str(result.run_dir), "steps": result.train.steps,
                          "train_seconds": round(result.train.train_seconds, 2)}))
        if result.train.steps >= config.total_steps:
            report_after_training(args, result.run_dir)
        return 0
    if args.action == "run":
        config = load_config(weak.WeakConfig, args.config, _overrides(args))
        report = weak.run(config, resume=args.resume, overwrite=args.overwrite)
        print(json.dumps(report, indent=2))
        if "stopped_at" not in report:
            report_after_training(args, config.run_dir)
        return 0
    config = load_config(weak.WeakConfig, args.model / "config.yaml", _overrides(args))
    report = weak.write_stage(args.model, config, args.out, pseudo=args.action == "pseudo-masks",
                              batch_size=args.batch_size)
    print(json.dumps({k: v for k, v in report.items() if k in ("images", "pseudo_root", "out")}))
    return 0
