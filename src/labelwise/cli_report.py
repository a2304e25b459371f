"""``labelwise report RUN_DIR ...`` and the report every training command writes when it ends
(``--no-report`` skips it): argument parsing over :mod:`labelwise.report.html`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from labelwise.cli_options import HelpFormatter, add
from labelwise.errors import CheckpointError, ConfigError, DataError

__all__ = ["REPORT_FILE", "add_report", "report_after_training", "run_report"]

#: The report a training command writes into its run folder.
REPORT_FILE = "report.html"


def add_report(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "report", help="one self-contained HTML report of one or more run folders", formatter_class=HelpFormatter,
        description="Write one HTML file (images and plots embedded, no scripts, nothing fetched) with each run's "
                    "provenance, validation metrics with per-class IoU bars, confusion matrix, training curves and "
                    "the best and worst predictions on its validation split (weak runs: their CAMs and "
                    "pseudo-masks; unsupervised runs: the cluster -> class mapping); several runs add a comparison "
                    "table. Training commands write RUN_DIR/report.html themselves.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders of any regime")
    add(parser, "out", default=Path(REPORT_FILE), metavar="HTML", help="the HTML file to write")
    add(parser, "config", help="YAML config whose data section names the split to predict (default: each run's "
                               "own config.yaml)")
    add(parser, "set", help="data.* override of the split's data config (repeatable)")
    add(parser, "split")
    parser.add_argument("--grid-images", type=int, default=3, metavar="N",
                        help="how many best and how many worst images the prediction grid shows")
    parser.add_argument("--limit", type=int, default=None, help="predict at most this many images of the split")
    parser.add_argument("--predictions", action=argparse.BooleanOptionalAction, default=True,
                        help="run each model over the split for the confusion matrix and the image grid")
    add(parser, "device")
    add(parser, "precision")


def run_report(args: argparse.Namespace) -> int:
    from labelwise.report.html import ReportOptions, write_report

    if args.grid_images < 0 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--grid-images must be >= 0 and --limit >= 1")
    options = ReportOptions(predictions=args.predictions, data_config=args.config, data_overrides=args.overrides,
                            split=args.split, images=args.grid_images, limit=args.limit,
                            device=args.device or "auto", precision=args.precision or "bf16")
    print(f"wrote {write_report(args.runs, args.out, options)}")
    return 0


def report_after_training(args: argparse.Namespace, run_dir: str | Path) -> Path | None:
    """Write ``run_dir/report.html`` unless ``--no-report`` was given (under ``torchrun``: rank 0
    only). The model is already saved when this runs, so a report that cannot be made is a warning
    on stderr, not a failure."""
    if not getattr(args, "report", True) or int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 only
        return None
    from labelwise.report.html import ReportOptions, write_report

    options = ReportOptions(device=getattr(args, "device", None) or "auto",
                            precision=getattr(args, "precision", None) or "bf16")
    try:
        path = write_report([run_dir], Path(run_dir) / REPORT_FILE, options)
    except (CheckpointError, ConfigError, DataError, OSError, ValueError) as exc:
        print(f"warning: {Path(run_dir) / REPORT_FILE} not written: {exc}", file=sys.stderr)
        return None
    print(f"report: {path}", file=sys.stderr)
    return path
