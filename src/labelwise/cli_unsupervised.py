"""``labelwise unsupervised train | evaluate``: argument parsing over
:mod:`labelwise.methods.unsupervised` (kept apart from ``cli.py`` so each file stays short)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = argparse.ArgumentDefaultsHelpFormatter

#: ``labelwise.methods.unsupervised.METHODS``, spelled out so that building the parser imports no torch.
UNSUPERVISED_METHODS = ("hp", "stego", "picie", "kmeans")


def add_unsupervised(commands) -> None:  # noqa: ANN001 - argparse's private subparsers action
    parser = commands.add_parser(
        "unsupervised", help="segment images into K semantic clusters without labels (HP, STEGO, PiCIE, k-means)",
        formatter_class=HELP, description="Train a head on frozen self-supervised ViT features, or evaluate it "
        "with the cluster probe on resized views and a linear probe; `labelwise predict RUN` segments your images "
        "(--match-with DIR maps clusters to class names).")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train a head (features cached once) and fit K cluster centroids",
                           formatter_class=HELP)
    train.add_argument("--config", type=Path, default=None,
                       help="YAML UnsupervisedConfig (default: built-in defaults, HP on the synthetic dataset)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set hp.temperature=0.6 (repeatable)")
    train.add_argument("--images", nargs="+", type=Path, default=None, metavar="DIR",
                       help="folders of unlabelled training images (default: the config's data training split)")
    train.add_argument("--clusters", type=int, default=None,
                       help="number of clusters K (default: the number of classes of the config's data; required "
                            "with --images)")
    train.add_argument("--method", choices=UNSUPERVISED_METHODS, default=None,
                       help="objective (default: the config's method, hp)")
    train.add_argument("--backbone", default=None,
                       help="frozen ViT: labelwise_default, a DINO name or a checkpoint path (default: the config's "
                            "features.backbone, labelwise_default)")
    train.add_argument("--steps", type=int, default=None, help="training steps (default: the config's steps, 1000)")
    train.add_argument("--run-dir", type=Path, default=None, help="output folder (default: the config's run_dir)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="discard checkpoints already in --run-dir")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                       help="where to run (default: the config's device, auto)")

    evaluate = sub.add_parser("evaluate", help="cluster probe (Hungarian), linear probe and optional CRF on a "
                              "labelled split", formatter_class=HELP)
    evaluate.add_argument("model", type=Path, help="run folder of `labelwise unsupervised train`")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a key of the run's config, e.g. --set data.root=... (repeatable)")
    evaluate.add_argument("--split", default=None, help="split to score (default: the config's data.val_split)")
    evaluate.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                          help="also report dense-CRF refined scores (default: the config's eval.crf, off)")
    evaluate.add_argument("--linear-probe", action=argparse.BooleanOptionalAction, default=None,
                          help="also train a linear probe on the train split's labels (default: the config's "
                               "eval.linear_probe, on)")
    evaluate.add_argument("--output", type=Path, default=None, help="also write the metrics JSON here")


def run_unsupervised(args: argparse.Namespace) -> int:
    from labelwise.config import load_config
    from labelwise.methods import unsupervised

    if args.action == "train":
        overrides = list(args.overrides)
        if args.images:
            overrides.append("images=" + json.dumps([str(path) for path in args.images]))
        for key, value in (("eval.clusters", args.clusters), ("method", args.method),
                           ("features.backbone", args.backbone), ("steps", args.steps), ("run_dir", args.run_dir),
                           ("device", args.device)):
            if value is not None:
                overrides.append(f"{key}={json.dumps(value if isinstance(value, int) else str(value))}")
        config = load_config(unsupervised.UnsupervisedConfig, args.config, overrides)
        result = unsupervised.train(config, resume=args.resume, overwrite=args.overwrite)
        print(json.dumps({"run_dir": str(result.run_dir), **result.summary}))
        return 0
    if args.action == "evaluate":
        config = load_config(unsupervised.UnsupervisedConfig, args.model / "config.yaml", args.overrides)
        report = unsupervised.evaluate(args.model, config, split=args.split, crf=args.crf, linear=args.linear_probe)
        text = json.dumps(report, indent=2)
        print(text)
        if args.output is not None:
            from labelwise.io.atomic import atomic_write_text

            atomic_write_text(args.output, text + "\n")
        return 0
    raise AssertionError(args.action)
