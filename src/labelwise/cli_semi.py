"""``labelwise semi split | train``: argument parsing over :mod:`labelwise.methods.semi` (kept
apart from ``cli.py`` so each file stays short)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from labelwise.cli_options import HelpFormatter, add, add_run_options, config_overrides
from labelwise.cli_report import report_after_training

#: ``labelwise.methods.semi.METHODS``, spelled out so that building the parser imports no torch.
SEMI_METHODS = ("supervised_only", "fixmatch", "unimatch", "self_training")


def add_semi(commands) -> None:  # noqa: ANN001 - argparse's private subparsers action
    parser = commands.add_parser(
        "semi", help="semi-supervised training from a few labeled and many unlabeled images",
        formatter_class=HelpFormatter, description="Split a labeled dataset into labeled / unlabeled parts, then "
        "train with consistency (FixMatch, UniMatch) or self-training.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    split = sub.add_parser("split", help="write labeled.txt / unlabeled.txt: a deterministic split of the "
                           "training split of a labeled dataset", formatter_class=HelpFormatter)
    add(split, "config", help="YAML train / semi config whose data section names the dataset (default: synthetic)")
    add(split, "set")
    size = split.add_mutually_exclusive_group(required=True)
    size.add_argument("--fraction", type=float, help="share of the training samples to label, e.g. 0.125")
    size.add_argument("--count", type=int, help="number of training samples to label")
    split.add_argument("--seed", type=int, default=0, help="seed of the draw (same seed: nested sizes)")
    add(split, "out", required=True, help="folder for labeled.txt and unlabeled.txt")

    train = sub.add_parser("train", help="train a segmenter from labeled and unlabeled images",
                           formatter_class=HelpFormatter)
    add_run_options(train)
    train.add_argument("--labeled", type=Path, default=None,
                       help="list file of the labeled training samples (sets data.train_list; default: the "
                            "config's, or every training sample)")
    train.add_argument("--unlabeled", nargs="+", type=Path, default=None, metavar="PATH",
                       help="folders of unlabeled images, or one list file (.txt) of training-split names whose "
                            "masks are then not used (default: the config's semi.unlabeled / unlabeled_list)")
    add(train, "method", key="semi.method", choices=SEMI_METHODS)
    add(train, "init")
    train.add_argument("--teacher", type=Path, default=None,
                       help="self_training: a finished model (run folder) to use as the round-0 teacher "
                            "instead of training one (sets semi.teacher)")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    overrides = config_overrides(args)
    if args.labeled is not None:
        overrides.append(f"data.train_list={json.dumps(str(args.labeled))}")
    if args.unlabeled:
        if len(args.unlabeled) == 1 and args.unlabeled[0].suffix == ".txt" and args.unlabeled[0].is_file():
            overrides.append(f"semi.unlabeled_list={json.dumps(str(args.unlabeled[0]))}")
        else:
            overrides.append("semi.unlabeled=" + json.dumps([str(p) for p in args.unlabeled]))
    if args.teacher is not None:
        overrides.append(f"semi.teacher={json.dumps(str(args.teacher))}")
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
        report_after_training(args, result.run_dir)
    return 0
