"""``labelwise <command>``: the command line, a thin layer over the Python API.

Options are declared once in :mod:`labelwise.cli_options`; each subcommand is registered here as
(name, parser builder, entry point), the regimes' own in ``cli_semi`` / ``cli_unsupervised`` /
``cli_weak``. Entry points parse nothing themselves: they turn the options into config overrides
and call the API.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

from labelwise.cli_options import HelpFormatter, add, add_run_options, config_overrides
from labelwise.cli_report import add_report, report_after_training, run_report
from labelwise.cli_semi import add_semi, run_semi
from labelwise.cli_unsupervised import add_unsupervised, run_unsupervised
from labelwise.cli_weak import add_weak, run_weak
from labelwise.demo import REGIMES
from labelwise.errors import LabelwiseError

DESCRIPTION = """\
Semantic segmentation from whatever labels you have. Pick the command by what you have:
  every pixel labeled          labelwise train        (then evaluate / predict)
  a few labeled images         labelwise semi train
  image-level tags only         labelwise weak run
  images only                   labelwise unsupervised train   (or pretrain a backbone: labelwise pretrain)
Every training command writes a model folder that `labelwise evaluate` and `labelwise predict` take.
Try `labelwise demo` first: it trains, evaluates and predicts on built-in synthetic data."""

#: ``labelwise.methods.pretrain.METHODS``, spelled out so that building the parser imports no torch.
PRETRAIN_METHODS = ("dino", "moco", "dense_moco", "rotation")


def _subparser(commands, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:  # noqa: A002, ANN001
    return commands.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".",
                               formatter_class=HelpFormatter)


def _add_train(commands) -> None:  # noqa: ANN001 - argparse's private subparsers action
    parser = _subparser(commands, "train", "train a segmentation model on fully labeled images",
                        "Train a model from a YAML config (see configs/) plus overrides; writes the model folder "
                        "(model.json + weights.safetensors), eval.json and checkpoints into the run folder.")
    add_run_options(parser)
    add(parser, "init")


def _add_evaluate(commands) -> None:  # noqa: ANN001
    parser = _subparser(commands, "evaluate", "score any model folder on a labeled split",
                        "Score a model folder of any regime on a labeled split: mIoU, pixel and mean accuracy, "
                        "per-class IoU. Unsupervised models are scored after Hungarian matching of their clusters.")
    add(parser, "model")
    add(parser, "config", help="YAML config whose data section names the dataset (default: the model's own "
                               "config.yaml when MODEL is a run folder, else the synthetic dataset)")
    add(parser, "set")
    add(parser, "split")
    for name in ("device", "precision", "window", "overlap", "flip", "crf", "match_with", "class_map", "metrics"):
        add(parser, name)
    add(parser, "report", default=False, help="MODEL a run folder: add these scores to its evaluations.json and "
                                              "rewrite MODEL/report.html with them")


def _add_predict(commands) -> None:  # noqa: ANN001
    parser = _subparser(commands, "predict", "segment images with any model folder",
                        "Segment image files or folders; writes OUT/ids (class ids), OUT/color and OUT/overlay "
                        "PNGs (and OUT/clusters for unsupervised models).")
    add(parser, "model")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE", help="image files or folders of images")
    add(parser, "out", default=Path("predictions"), help="output folder")
    for name in ("device", "precision", "window", "overlap", "flip", "crf", "match_with", "class_map", "alpha"):
        add(parser, name)


def _add_demo(commands) -> None:  # noqa: ANN001
    parser = _subparser(commands, "demo", "every regime on built-in synthetic data, one comparison report",
                        "Segment one synthetic dataset (no download) four ways: supervised (every mask), semi "
                        "(8 masks + unlabeled images), weak (image tags only) and unsupervised (no labels); writes "
                        "RUN_DIR/<regime>/ and the comparison report RUN_DIR/report.html (under 5 minutes on 2 CPU "
                        "cores).")
    add(parser, "run_dir", default=Path("runs/demo"), help="output folder")
    add(parser, "steps", default=300, help="training steps of each segmenter (the weak classifier: a third)")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES), metavar="REGIME",
                        help=f"which regimes to run, of {', '.join(REGIMES)}")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add(parser, "device")
    add(parser, "precision")


def _add_attention(commands) -> None:  # noqa: ANN001
    parser = _subparser(commands, "attention", "PNGs of a ViT's class-token attention (per head, mean, overlay)")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    add(parser, "backbone", required=True, help="ViT backbone: labelwise_default, a DINO / DINOv2 name or a "
                                                "checkpoint path")
    add(parser, "out", default=Path("attention"),
        help="output folder; each image gets OUT/<stem>/head_XX.png, mean.png, overlay.png")
    parser.add_argument("--size", type=int, default=480,
                        help="resize so the shorter image side has this many pixels (0 = original size)")
    parser.add_argument("--block", type=int, default=-1, help="transformer block (negative counts from the end)")
    add(parser, "alpha")
    add(parser, "device")
    add(parser, "precision", help="fp32 (exact maps) or bf16 autocast (default: fp32)")


def _add_pretrain(commands) -> None:  # noqa: ANN001
    parser = _subparser(commands, "pretrain", "self-supervised pretraining of a backbone on unlabeled images",
                        "Pretrain a ViT or the U-Net encoder on folders of images (DINO / iBOT, MoCo, dense MoCo or "
                        "rotation prediction); writes the backbone artifact RUN_DIR/weights.safetensors + "
                        "RUN_DIR/model.json.")
    add_run_options(parser)
    add(parser, "images", key="data.images")
    add(parser, "method", choices=PRETRAIN_METHODS)
    add(parser, "steps", help="training steps, replacing epochs (default: the config's stages.0.steps or epochs)")
    add(parser, "init", key="init", help="continue pretraining from this backbone (a DINO checkpoint, a labelwise "
                                         "pretraining run folder or its weights, mobilenet_v2_imagenet); heads start "
                                         "fresh (default: the config's init, none)")


def _train(args: argparse.Namespace) -> int:
    from labelwise.config import TrainConfig, load_config
    from labelwise.methods import supervised

    config = load_config(TrainConfig, args.config, config_overrides(args))
    result = supervised.train(config, resume=args.resume, overwrite=args.overwrite)
    if result.metrics:
        print(json.dumps({k: result.metrics[k] for k in ("miou", "pixel_acc", "mean_acc") if k in result.metrics}))
        report_after_training(args, result.run_dir)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from labelwise.config import load_config
    from labelwise.methods import pretrain

    overrides = config_overrides(args) + (["epochs=null"] if args.steps is not None else [])
    config = load_config(pretrain.PretrainConfig, args.config, overrides)
    result = pretrain.train(config, resume=args.resume, overwrite=args.overwrite)
    if result.summary:
        keys = ("method", "steps", "images_seen", "epochs", "train_seconds", "images_per_second", "backbone_path")
        print(json.dumps({k: result.summary[k] for k in keys}))
        report_after_training(args, result.run_dir)
    return 0


def _inference(args: argparse.Namespace) -> int:
    """``evaluate`` / ``predict``: one code path for every regime's model folder."""
    import labelwise
    from labelwise.inference import evaluate, predict_files

    predictor = labelwise.load(args.model, device=args.device or "auto", precision=args.precision or "bf16")
    options = predictor.options(window=args.window, overlap=args.overlap, flip=args.flip)
    if args.match_with is not None:
        from labelwise.data import FolderDataset
        from labelwise.data.classmap import ClassMap

        class_map = ClassMap.from_json(args.class_map or args.match_with / "classes.json")
        predictor.match(FolderDataset(args.match_with, class_map), options)
        print(f"matched {predictor.outputs.num_classes} outputs to the classes of {args.match_with}: "
              f"{dict(zip(predictor.outputs.names, (predictor.class_map.names[i] for i in predictor.mapping)))}")
    if args.command == "predict":
        written = predict_files(predictor, args.inputs, args.out, options, crf=bool(args.crf), alpha=args.alpha)
        print(f"wrote predictions of {len(written)} image(s) to {args.out}/{{ids,color,overlay}}")
        return 0
    from labelwise.config import load_data_config
    from labelwise.data.build import build_eval_dataset

    path = args.config
    if path is None and (args.model / "config.yaml").is_file():
        path = args.model / "config.yaml"
    data = load_data_config(path, args.overrides)
    dataset, _ = build_eval_dataset(data, args.split)
    report = evaluate(predictor, dataset, options, crf=bool(args.crf))
    text = json.dumps(report, indent=2)
    print(text)
    if args.metrics is not None:
        from labelwise.io.atomic import atomic_write_text

        atomic_write_text(args.metrics, text + "\n")
    if args.report:
        from contextlib import nullcontext

        from labelwise.config import to_dict
        from labelwise.io.run_lock import run_folder_lock
        from labelwise.report.evaluations import add_evaluation

        # not while a training command writes into the folder
        with run_folder_lock(args.model) if Path(args.model).is_dir() else nullcontext():
            add_evaluation(args.model, report, args.split or data.val_split, to_dict(data), crf=bool(args.crf))
            report_after_training(args, args.model)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from labelwise.demo import run_demo

    run_demo(args.run_dir, steps=args.steps, device=args.device or "auto", precision=args.precision or "bf16",
             progress=not args.no_progress, regimes=args.regimes)
    return 0


def _attention(args: argparse.Namespace) -> int:
    from labelwise.models.vit_loading import load_vit
    from labelwise.report.attention import write_attention_figures

    written = write_attention_figures(load_vit(args.backbone), args.images, args.out, size=args.size or None,
                                      block=args.block, device=args.device or "auto",
                                      precision=args.precision or "fp32", alpha=args.alpha)
    count = sum(len(paths) for paths in written.values())
    print(f"wrote {count} attention PNG(s) for {len(written)} image(s) to {args.out}/")
    return 0


#: (name, parser builder, entry point) of every subcommand, in ``--help`` order.
COMMANDS: list[tuple[str, Callable, Callable[[argparse.Namespace], int]]] = [
    ("demo", _add_demo, _demo),
    ("train", _add_train, _train),
    ("semi", add_semi, run_semi),
    ("weak", add_weak, run_weak),
    ("unsupervised", add_unsupervised, run_unsupervised),
    ("pretrain", _add_pretrain, _pretrain),
    ("evaluate", _add_evaluate, _inference),
    ("predict", _add_predict, _inference),
    ("report", add_report, run_report),
    ("attention", _add_attention, _attention),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labelwise", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, add_parser, _ in COMMANDS:
        add_parser(commands)
    return parser


def run(args: argparse.Namespace) -> int:
    entry = {name: entry for name, _, entry in COMMANDS}[args.command]
    return entry(args)


#: Operating-system errors reported as one line (the file and the reason) instead of a traceback.
USER_FACING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                      errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EMFILE}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:  # noqa: ANN001, ARG001
    return f"labelwise: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        # past a file-size limit (ulimit -f) a write then fails with EFBIG, which is reported
        # like a full disk, instead of the signal killing the process mid-write
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    warnings.formatwarning = _one_line_warning
    try:
        return run(args)
    except LabelwiseError as exc:
        print(f"labelwise {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_FACING_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"labelwise {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
