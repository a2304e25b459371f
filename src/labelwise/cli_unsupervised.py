"""``labelwise unsupervised train | probe | refine``: argument parsing over
:mod:`labelwise.methods.unsupervised` (kept apart from ``cli.py`` so each file stays short)."""

from __future__ import annotations

import argparse
import json

from labelwise.cli_options import HelpFormatter, add, add_run_options, config_overrides
from labelwise.cli_report import report_after_training

#: ``labelwise.methods.unsupervised.METHODS``, spelled out so that building the parser imports no torch.
UNSUPERVISED_METHODS = ("hp", "stego", "picie", "kmeans", "primaps")


def add_unsupervised(commands) -> None:  # noqa: ANN001 - argparse's private subparsers action
    parser = commands.add_parser(
        "unsupervised", help="segment images into K semantic clusters without labels (HP, STEGO, PiCIE, k-means)",
        formatter_class=HelpFormatter, description="Train a head on frozen self-supervised ViT features, or probe "
        "the run's features with the research protocol (cluster probe on the run's evaluation views, linear "
        "probe). The run folder is a model like every other: `labelwise evaluate RUN --match-with DIR` scores it "
        "and `labelwise predict RUN` segments your images (--match-with DIR maps clusters to class names).")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train a head (features cached once) and fit K cluster centroids",
                           formatter_class=HelpFormatter)
    add_run_options(train)
    add(train, "images", help="folders of unlabeled training images (default: the config's images, or its data "
                              "training split)")
    train.add_argument("--clusters", type=int, default=None,
                       help="number of clusters K (default: the number of classes of the config's data; required "
                            "with --images)")
    add(train, "method", choices=UNSUPERVISED_METHODS)
    add(train, "backbone", key="features.backbone")
    add(train, "steps")
    train.set_defaults(_config_keys={**train.get_default("_config_keys"), "clusters": "eval.clusters"})

    evaluate = sub.add_parser("probe", help="the research protocol: cluster probe (Hungarian) on the run's "
                              "evaluation views, linear probe and optional CRF on a labeled split",
                              formatter_class=HelpFormatter)
    add(evaluate, "model", help="run folder of `labelwise unsupervised train`")
    add(evaluate, "set")
    add(evaluate, "split")
    add(evaluate, "crf", key="eval.crf")
    evaluate.add_argument("--linear-probe", action=argparse.BooleanOptionalAction, default=None,
                          help="also train a linear probe on the train split's labels (default: the config's "
                               "eval.linear_probe, on)")
    add(evaluate, "device")
    add(evaluate, "precision")
    add(evaluate, "metrics")
    evaluate.set_defaults(_config_keys={**evaluate.get_default("_config_keys"), "linear_probe": "eval.linear_probe"})

    refine = sub.add_parser("refine", help="self-training refinement: train a segmenter on the run's confident "
                            "cluster predictions (one or more rounds); the result is a cluster model like the run",
                            formatter_class=HelpFormatter, description="Pseudo-label the run's training images with "
                            "its clusters (the most confident part of each cluster per image, optionally after a "
                            "dense CRF), train a segmenter on them (default: U-Net on the ImageNet MobileNetV2 "
                            "encoder) and repeat with it as the teacher. No labels are used; the output folder's "
                            "round folders load and evaluate like the run (clusters matched to classes at "
                            "evaluation). Prints the summary also written to OUT/refine.json.")
    add(refine, "model", metavar="RUN", help="run folder of `labelwise unsupervised train`")
    add(refine, "config", help="YAML of the refinement settings (RefineConfig; default: none, the built-in settings)")
    add(refine, "set", help="override a refinement setting, e.g. --set keep_fraction=0.3 or --set "
                            "segmenter_overrides.0=stages.0.lr=0.001; values are YAML (repeatable)")
    refine.add_argument("--rounds", type=int, default=None,
                        help="self-training rounds, each teaching the next (default: the config's rounds, 1)")
    add(refine, "crf", key="crf", help="dense CRF on the cluster probabilities before taking pseudo-labels "
                                       "(default: the config's crf, off)")
    add(refine, "steps", key="steps", help="training steps of the segmenter's stage (default: the config's steps, "
                                           "else the segmenter recipe's)")
    add(refine, "out", key="out_dir", help="output folder (default: the config's out_dir, else RUN/refine)")
    add(refine, "resume", help="continue an unfinished round from its pseudo-labels and segmenter checkpoints")
    add(refine, "overwrite", help="redo every round, discarding the output folder's rounds")
    add(refine, "device")
    add(refine, "precision")
    refine.set_defaults(_config_keys={**refine.get_default("_config_keys"), "rounds": "rounds"})


def run_unsupervised(args: argparse.Namespace) -> int:
    from labelwise.config import load_config
    from labelwise.methods import unsupervised

    if args.action == "train":
        config = load_config(unsupervised.UnsupervisedConfig, args.config, config_overrides(args))
        result = unsupervised.train(config, resume=args.resume, overwrite=args.overwrite)
        print(json.dumps({"run_dir": str(result.run_dir), **result.summary}))
        report_after_training(args, result.run_dir)
        return 0
    if args.action == "probe":
        config = load_config(unsupervised.UnsupervisedConfig, args.model / "config.yaml", config_overrides(args))
        report = unsupervised.probe(args.model, config, split=args.split)
        text = json.dumps(report, indent=2)
        print(text)
        if args.metrics is not None:
            from labelwise.io.atomic import atomic_write_text

            atomic_write_text(args.metrics, text + "\n")
        return 0
    if args.action == "refine":
        from labelwise.methods.unsupervised.refine import RefineConfig, refine

        result = refine(args.model, load_config(RefineConfig, args.config, config_overrides(args)),
                        resume=args.resume, overwrite=args.overwrite)
        print(json.dumps(result.summary, indent=2))
        return 0
    raise AssertionError(args.action)
