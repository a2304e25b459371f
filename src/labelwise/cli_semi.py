"""``labelwise semi split | train``: argument parsing over :mod:`labelwise.methods.semi` (kept
apart from ``cli.py`` so each file stays short)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = argparse.ArgumentDefaultsHelpFormatter

#: ``labelwise.methods.semi.METHODS``, spelled out so that building the parser imports no torch.
SEMI_METHODS = ("supervised_only", "fixmatch", "unimatch", "self_training")


def add_semi(commands) -> None:  # noqa: ANN001 - argparse's private subparsers action
    parser = commands.add_parser(
        "semi", help="semi-supervised training from a few labelled and many unlabelled images",
        formatter_class=HELP, description="Split a labelled dataset into labelled / unlabelled parts, then train "
        "with consistency (FixMatch, UniMatch) or self-training.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    split = sub.add_parser("split", help="write labeled.txt / unlabeled.txt: a deterministic split of the "
                           "training split of a labelled dataset", formatter_class=HELP)
    split.add_argument("--config", type=Path, default=None,
                       help="YAML train/semi config whose data section names the dataset (default: synthetic)")
    split.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set data.root=../shared/data/camvid (repeatable)")
    size = split.add_mutually_exclusive_group(required=True)
    size.add_argument("--fraction", type=float, help="share of the training samples to label, e.g. 0.125")
    size.add_argument("--count", type=int, help="number of training samples to label")
    split.add_argument("--seed", type=int, default=0, help="seed of the draw (same seed: nested sizes)")
    split.add_argument("--out", type=Path, required=True, help="folder for labeled.txt and unlabeled.txt")

    train = sub.add_parser("train", help="train a segmenter from labelled and unlabelled images", formatter_class=HELP)
    train.add_argument("--config", type=Path, default=None,
                       help="YAML SemiConfig: any `labelwise train` YAML plus an optional semi section "
                            "(default: built-in defaults on the synthetic dataset)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set semi.threshold=0.9 (repeatable)")
    train.add_argument("--labeled", type=Path, default=None,
                       help="list file of the labelled training samples (sets data.train_list; default: the "
                            "config's, or every training sample)")
    train.add_argument("--unlabeled", nargs="+", type=Path, default=None, metavar="PATH",
                       help="folders of unlabelled images, or one list file (.txt) of training-split names whose "
                            "masks are then not used (default: the config's semi.unlabeled / unlabeled_list)")
    train.add_argument("--method", choices=SEMI_METHODS, default=None,
                       help="method (default: the config's semi.method, unimatch)")
    train.add_argument("--init", type=Path, default=None,
                       help="pretrained encoder: a self-supervised checkpoint, a model folder or a named weights file such as "
                            "mobilenet_v2_imagenet (sets model.init)")
    train.add_argument("--teacher", type=Path, default=None,
                       help="self_training: a finished model (run folder) to use as the round-0 teacher "
                            "instead of training one (sets semi.teacher)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                       help="where to run (default: the config's device, auto)")
    train.add_argument("--run-dir", type=Path, default=None, help="output folder (default: the config's run_dir)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="discard checkpoints already in --run-dir")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.labeled is not None:
        overrides.append(f"data.train_list={json.dumps(str(args.labeled))}")
    if args.unlabeled:
        if len(args.unlabeled) == 1 and args.unlabeled[0].suffix == ".txt" and args.unlabeled[0].is_file():
            overrides.append(f"semi.unlabeled_list={json.dumps(str(args.unlabeled[0]))}")
        else:
            overrides.append("semi.unlabeled=" + json.dumps([str(p) for p in args.unlabeled]))
    for key, value in (("semi.method", args.method), ("model.init", args.init),
                       ("semi.teacher", args.teacher), ("device", args.device),
                       ("run_dir", args.run_dir)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(str(value))}")
    return overrides


def run_semi(args: argparse.Namespace) -> int:
    from labelwise.config import load_config
    from labelwise.methods import semi

    if args.action == "split":
        from labelwise.data.build import build_datasets
        from labelwise.data.splits import dataset_names, split_labeled, write_split

        config = load_config(semi.SemiConfig, args.config, [*args.overrides, "semi.method=supervised_only",
                                                            "data.train_list=null"])
        names = dataset_names(build_datasets(config.data, seed=config.seed).train_source)
        split = split_labeled(names, fraction=args.fraction, count=args.count, seed=args.seed)
        labeled, unlabeled = write_split(args.out, split)
        print(json.dumps({"labeled": str(labeled), "unlabeled": str(unlabeled), "labeled_images": len(split.labeled),
                          "unlabeled_images": len(split.unlabeled)}))
        return 0
    config = load_config(semi.SemiConfig, args.config, _train_overrides(args))
    result = semi.train(config, resume=args.resume, overwrite=args.overwrite)
    if result.metrics:
        print(json.dumps({k: result.metrics[k] for k in ("miou", "pixel_acc", "mean_acc") if k in result.metrics}))
    return 0
