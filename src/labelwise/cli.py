"""``labelwise <command>``: a thin argument parser over the Python API.

Commands: ``train``, ``evaluate``, ``predict``, ``demo``, ``attention``, ``pretrain``, ``unsupervised``
(``train`` / ``evaluate`` / ``predict``; in :mod:`labelwise.cli_unsupervised`), ``weak`` (``train`` /
``cams`` / ``pseudo-masks``; in :mod:`labelwise.cli_weak`), ``semi`` (``split`` / ``train``; in
:mod:`labelwise.cli_semi`). Every option's help states its default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from labelwise.cli_semi import add_semi, run_semi
from labelwise.cli_unsupervised import add_unsupervised, run_unsupervised
from labelwise.cli_weak import add_weak, run_weak
from labelwise.errors import LabelwiseError

HELP = argparse.ArgumentDefaultsHelpFormatter


def _add_runtime(parser: argparse.ArgumentParser, with_config_defaults: bool) -> None:
    default = None if with_config_defaults else "auto"
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=default,
                        help="where to run: auto picks CUDA when available" +
                             (" (default: the config's device, auto)" if with_config_defaults else ""))
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None if with_config_defaults else "bf16",
                        help="bf16 autocast (fast on AMX CPUs and GPUs) or full fp32" +
                             (" (default: the config's precision, bf16)" if with_config_defaults else ""))


def _add_data_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config whose data section describes the dataset (default: the model's own "
                             "config.yaml when MODEL is a run folder, else the synthetic dataset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.root=../shared/data/camvid (repeatable)")
    parser.add_argument("--split", default=None,
                        help="split to evaluate (camvid/folder: sub-folder name; aerial: tile numbers like 6,7); "
                             "default: the config's data.val_split")


def _add_window(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=int, default=None,
                        help="sliding-window size in pixels for large images (default: the model's eval setting; "
                             "0 = whole image)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="sliding-window overlap fraction in [0, 1) (default: the model's eval setting, 0.5)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="average with the horizontally mirrored prediction (default: the model's eval setting, off)")
    parser.add_argument("--crf", action="store_true", help="refine the prediction with a dense CRF (pydensecrf2)")
    parser.add_argument("--match-with", type=Path, default=None, metavar="DIR",
                        help="unsupervised models: map clusters to classes by Hungarian matching on the labelled "
                             "images of DIR (images/ + labels/, classes.json); evaluate otherwise matches on the "
                             "evaluated split itself")
    parser.add_argument("--class-map", type=Path, default=None,
                        help="class map JSON of the --match-with images (default: DIR/classes.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labelwise", description=__doc__.split("\n")[0], formatter_class=HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a supervised segmentation model", formatter_class=HELP,
                                description="Train a model from a YAML config (see configs/) plus overrides.")
    train.add_argument("--config", type=Path, default=None, help="YAML TrainConfig (default: built-in defaults: "
                       "U-Net on the synthetic dataset)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set stages.0.lr=0.002 (repeatable; values are YAML)")
    train.add_argument("--run-dir", type=Path, default=None, help="output folder (default: the config's run_dir)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="discard checkpoints already in --run-dir")
    train.add_argument("--init", type=Path, default=None,
                       help="initialise the encoder from PATH before training: a labelwise model folder, a "
                            "pretraining run's backbone.safetensors, a ViT checkpoint or a named CNN weights file "
                            "(mobilenet_v2_imagenet); writes init_report.json; "
                            "ignored with --resume (default: the config's model.init, none)")
    _add_runtime(train, with_config_defaults=True)

    evaluate = commands.add_parser("evaluate", help="evaluate any model folder on a labelled split",
                                   formatter_class=HELP)
    evaluate.add_argument("model", type=Path, help="model folder: a run folder, or any folder with model.json + weights.safetensors")
    _add_data_selection(evaluate)
    _add_window(evaluate)
    evaluate.add_argument("--metrics", type=Path, default=None, help="also write the metrics JSON to this file")
    _add_runtime(evaluate, with_config_defaults=False)

    predict = commands.add_parser("predict", help="segment images with any model folder; writes ids/, color/, "
                                  "overlay/ PNGs",
                                  formatter_class=HELP)
    predict.add_argument("model", type=Path, help="model folder: a run folder, or any folder with model.json + weights.safetensors")
    predict.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    predict.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    predict.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours")
    _add_window(predict)
    _add_runtime(predict, with_config_defaults=False)

    demo = commands.add_parser("demo", help="train + evaluate + predict a small U-Net on synthetic data",
                               formatter_class=HELP)
    demo.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="output folder")
    demo.add_argument("--steps", type=int, default=300, help="training steps")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_runtime(demo, with_config_defaults=False)

    attention = commands.add_parser("attention", help="PNGs of a ViT's class-token attention (per head, mean, overlay)",
                                    formatter_class=HELP)
    attention.add_argument("images", nargs="+", type=Path, help="image files")
    attention.add_argument("--backbone", required=True,
                           help="ViT checkpoint file or backbone name (labelwise_default, DINO/DINOv2 names)")
    attention.add_argument("--out", type=Path, default=Path("attention"),
                           help="output folder; each image gets <out>/<stem>/head_XX.png, mean.png, overlay.png")
    attention.add_argument("--size", type=int, default=480,
                           help="resize so the shorter image side has this many pixels (0 = original size)")
    attention.add_argument("--block", type=int, default=-1, help="transformer block (negative counts from the end)")
    attention.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour-mapped mean")
    attention.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                           help="where to run: auto picks CUDA when available")
    attention.add_argument("--precision", choices=["bf16", "fp32"], default="fp32",
                           help="fp32 (exact maps) or bf16 autocast")
    _add_pretrain(commands)
    add_unsupervised(commands)
    add_weak(commands)
    add_semi(commands)
    return parser


#: ``labelwise.methods.pretrain.METHODS``, spelled out so that building the parser imports no torch.
PRETRAIN_METHODS = ("dino", "moco", "dense_moco", "rotation")


def _add_pretrain(commands) -> None:  # noqa: ANN001 - argparse's private subparsers action
    pretrain = commands.add_parser(
        "pretrain", help="self-supervised pretraining of a backbone on unlabelled images", formatter_class=HELP,
        description="Pretrain a ViT or the U-Net encoder on folders of images (DINO / iBOT, MoCo, dense MoCo or "
                    "rotation prediction); writes RUN_DIR/backbone.safetensors and RUN_DIR/pretrain.json.")
    pretrain.add_argument("--config", type=Path, default=None,
                          help="YAML PretrainConfig (default: built-in defaults: DINO, ViT-Tiny/16, 96/48 px crops)")
    pretrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config key, e.g. --set dino.out_dim=2048 (repeatable; values are YAML)")
    pretrain.add_argument("--images", nargs="+", type=Path, default=None, metavar="DIR",
                          help="image folders, searched recursively (default: the config's data.images)")
    pretrain.add_argument("--method", choices=PRETRAIN_METHODS, default=None,
                          help="pretraining objective (default: the config's method, dino)")
    pretrain.add_argument("--steps", type=int, default=None,
                          help="training steps, replacing steps/epochs (default: the config's steps, 1000)")
    pretrain.add_argument("--run-dir", type=Path, default=None,
                          help="output folder (default: the config's run_dir, runs/pretrain)")
    pretrain.add_argument("--init", type=Path, default=None,
                          help="continue pretraining from this backbone (official DINO checkpoint, a labelwise "
                               "backbone.safetensors or run folder); heads start fresh (default: the config's init, "
                               "none = random weights)")
    pretrain.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    pretrain.add_argument("--overwrite", action="store_true", help="discard checkpoints already in --run-dir")
    _add_runtime(pretrain, with_config_defaults=True)


def _pretrain(args: argparse.Namespace) -> int:
    from labelwise.config import load_config
    from labelwise.methods import pretrain

    overrides = list(args.overrides)
    if args.images:
        overrides.append("data.images=" + json.dumps([str(path) for path in args.images]))
    if args.steps is not None:
        overrides += [f"steps={args.steps}", "epochs=null"]
    for key, value in (("method", args.method), ("run_dir", args.run_dir), ("device", args.device),
                       ("precision", args.precision), ("init", args.init)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(str(value))}")
    config = load_config(pretrain.PretrainConfig, args.config, overrides)
    result = pretrain.train(config, resume=args.resume, overwrite=args.overwrite)
    if result.summary:
        keys = ("method", "steps", "images_seen", "epochs", "train_seconds", "images_per_second", "backbone_path")
        print(json.dumps({k: result.summary[k] for k in keys}))
    return 0


def _inference(args: argparse.Namespace) -> int:
    """``evaluate`` / ``predict``: one code path for every regime's model folder."""
    import labelwise
    from labelwise.inference import evaluate, predict_files

    predictor = labelwise.load(args.model, device=args.device, precision=args.precision)
    options = predictor.options(window=args.window, overlap=args.overlap, flip=args.flip)
    if args.match_with is not None:
        from labelwise.data import FolderDataset
        from labelwise.data.classmap import ClassMap

        class_map = ClassMap.from_json(args.class_map or args.match_with / "classes.json")
        predictor.match(FolderDataset(args.match_with, class_map), options)
        print(f"matched {predictor.outputs.num_classes} outputs to the classes of {args.match_with}: "
              f"{dict(zip(predictor.outputs.names, (predictor.class_map.names[i] for i in predictor.mapping)))}")
    if args.command == "predict":
        written = predict_files(predictor, args.inputs, args.out, options, crf=args.crf, alpha=args.alpha)
        print(f"wrote predictions of {len(written)} image(s) to {args.out}/{{ids,color,overlay}}")
        return 0
    from labelwise.config import load_data_config
    from labelwise.data.build import build_eval_dataset

    path = args.config
    if path is None and (args.model / "config.yaml").is_file():
        path = args.model / "config.yaml"
    dataset, _ = build_eval_dataset(load_data_config(path, args.overrides), args.split)
    report = evaluate(predictor, dataset, options, crf=args.crf)
    text = json.dumps(report, indent=2)
    print(text)
    if args.metrics is not None:
        from labelwise.io.atomic import atomic_write_text

        atomic_write_text(args.metrics, text + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    from labelwise.methods import supervised

    if args.command == "train":
        from labelwise.config import TrainConfig, load_config

        overrides = list(args.overrides)
        if args.run_dir is not None:
            overrides.append(f"run_dir={args.run_dir}")
        if args.device is not None:
            overrides.append(f"device={args.device}")
        if args.precision is not None:
            overrides.append(f"precision={args.precision}")
        config = load_config(TrainConfig, args.config, overrides)
        if args.init is not None:
            config.model.init = str(args.init)
        result = supervised.train(config, resume=args.resume, overwrite=args.overwrite)
        if result.metrics:
            print(json.dumps({k: result.metrics[k] for k in ("miou", "pixel_acc", "mean_acc") if k in result.metrics}))
        return 0
    if args.command in ("evaluate", "predict"):
        return _inference(args)
    if args.command == "attention":
        from labelwise.models.vit_loading import load_vit
        from labelwise.report.attention import write_attention_figures

        written = write_attention_figures(load_vit(args.backbone), args.images, args.out, size=args.size or None,
                                          block=args.block, device=args.device, precision=args.precision,
                                          alpha=args.alpha)
        count = sum(len(paths) for paths in written.values())
        print(f"wrote {count} attention PNG(s) for {len(written)} image(s) to {args.out}/")
        return 0
    if args.command == "pretrain":
        return _pretrain(args)
    if args.command == "unsupervised":
        return run_unsupervised(args)
    if args.command == "weak":
        return run_weak(args)
    if args.command == "semi":
        return run_semi(args)
    if args.command == "demo":
        supervised.demo(args.run_dir, steps=args.steps, device=args.device, precision=args.precision,
                        progress=not args.no_progress)
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LabelwiseError as exc:
        print(f"labelwise {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
