"""``labelwise weak train | cams | pseudo-masks | run``: argument parsing over
:mod:`labelwise.methods.weak` (kept apart from ``cli.py`` so each file stays short)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = argparse.ArgumentDefaultsHelpFormatter


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set tag_min_fraction=0.02 (repeatable)")
    parser.add_argument("--images", nargs="+", type=Path, default=None, metavar="DIR",
                        help="folders of training images (default: the config's data training split, tags "
                             "derived from its masks)")
    parser.add_argument("--tags", type=Path, default=None,
                        help="tag file for --images: CSV 'image,tags' (tags separated by ';') or JSON "
                             "{image: [class, ...]}")
    parser.add_argument("--classes", type=Path, default=None,
                        help="classes.json naming the classes of the tag file (sets data.class_map)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="where to run (default: the config's device, auto)")


def add_weak(commands) -> None:  # noqa: ANN001 - argparse's private subparsers action
    parser = commands.add_parser(
        "weak", help="weak supervision from image-level tags (MCTformer): classifier, CAMs, pseudo-masks",
        formatter_class=HELP, description="Train a multi-class-token ViT on image tags, then turn its class "
        "activation maps into pseudo-masks that `labelwise train` can learn from.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train the multi-class-token ViT classifier on image tags",
                           formatter_class=HELP)
    train.add_argument("--config", type=Path, default=None,
                       help="YAML WeakConfig (default: built-in defaults on the synthetic dataset)")
    _add_data_options(train)
    train.add_argument("--backbone", default=None,
                       help="ViT to start from: labelwise_default, a DINO / DeiT checkpoint path (default: the "
                            "config's backbone, labelwise_default)")
    train.add_argument("--steps", type=int, default=None, help="training steps (default: the config's steps, 1000)")
    train.add_argument("--run-dir", type=Path, default=None, help="output folder (default: the config's run_dir)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="discard checkpoints already in --run-dir")

    run = sub.add_parser("run", help="every stage: classifier, pseudo-masks, segmenter trained on them, and "
                         "its score on the data's validation split when the data is labelled", formatter_class=HELP)
    run.add_argument("--config", type=Path, default=None,
                     help="YAML WeakConfig (default: built-in defaults on the synthetic dataset)")
    _add_data_options(run)
    run.add_argument("--backbone", default=None, help="ViT to start from (default: the config's backbone)")
    run.add_argument("--steps", type=int, default=None, help="classifier steps (default: the config's steps, 1000)")
    run.add_argument("--run-dir", type=Path, default=None, help="output folder (default: the config's run_dir)")
    run.add_argument("--resume", action="store_true", help="continue the stages already started in --run-dir")

    for action, text in (("cams", "write each tagged class's activation map of every training image (PNG)"),
                         ("pseudo-masks", "write pseudo-masks of every training image as a labelwise folder "
                                          "dataset (and the CAM PNGs)")):
        stage = sub.add_parser(action, help=text, formatter_class=HELP)
        stage.add_argument("model", type=Path, help="run folder of `labelwise weak train`")
        _add_data_options(stage)
        stage.add_argument("--out", type=Path, default=None,
                           help="output folder (default: <model>/cams or <model>/pseudo_masks)")
        stage.add_argument("--batch-size", type=int, default=8, help="images per forward (same-size images only)")


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.images:
        overrides.append("images=" + json.dumps([str(path) for path in args.images]))
    for key, value in (("tags", args.tags), ("data.class_map", args.classes), ("device", args.device),
                       ("backbone", getattr(args, "backbone", None)), ("steps", getattr(args, "steps", None)),
                       ("run_dir", getattr(args, "run_dir", None))):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value if isinstance(value, int) else str(value))}")
    return overrides


def run_weak(args: argparse.Namespace) -> int:
    from labelwise.config import load_config
    from labelwise.engine.runtime import resolve_device
    from labelwise.methods import weak

    if args.action == "train":
        config = load_config(weak.WeakConfig, args.config, _overrides(args))
        result = weak.train_classifier(config, resume=args.resume, overwrite=args.overwrite)
        print(json.dumps({"run_dir": str(result.run_dir), "steps": result.train.steps,
                          "train_seconds": round(result.train.train_seconds, 2)}))
        return 0
    if args.action == "run":
        config = load_config(weak.WeakConfig, args.config, _overrides(args))
        print(json.dumps(weak.run(config, resume=args.resume), indent=2))
        return 0
    config = load_config(weak.WeakConfig, args.model / "config.yaml", _overrides(args))
    config.validate()
    dataset, _ = weak.train.tagged_training_images(config, whole=True)
    items = weak.TaggedImages(dataset.source, dataset.num_classes, None, tags=dataset.tags,
                              min_fraction=dataset.min_fraction, ignore_index=dataset.ignore_index)
    pseudo = args.action == "pseudo-masks"
    out = args.out or args.model / ("pseudo_masks" if pseudo else "cams")
    report = weak.make_pseudo_masks(args.model, items, out, config.cams, config.pseudo_masks,
                                    batch_size=args.batch_size, write_cams=True, write_pseudo=pseudo,
                                    device=resolve_device(config.device))
    print(json.dumps({k: v for k, v in report.items() if k in ("images", "pseudo_root")} | {"out": str(out)}))
    return 0
