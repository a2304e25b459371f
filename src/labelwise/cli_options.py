"""Every command-line option, declared once: its flags, meaning, help text and the config key it
sets. Subcommands pick options by name (:func:`add`), so one option name means one thing in every
command; :func:`config_overrides` is the one function that turns the options given into
``key=value`` overrides of the command's config.

Help texts state the default once: a command whose option falls back to its config says so
(``default: the config's <key>``), other defaults are printed by :class:`HelpFormatter`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OPTIONS", "RUN_OPTIONS", "INFERENCE_OPTIONS", "HelpFormatter", "Option", "add", "add_run_options",
           "config_overrides"]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("bf16", "fp32")


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already states its default or
    there is none worth printing (``None``, ``False``, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


@dataclass(frozen=True)
class Option:
    """One option: its flags, ``argparse`` keyword arguments and the config key it sets (``None``
    when the command consumes the value itself)."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    key: str | None = None


def _config_default(what: str) -> str:
    return f"default: the config's {what}"


OPTIONS: dict[str, Option] = {
    # -- run: every training command ---------------------------------------------------------
    "config": Option(("--config",), {"type": Path, "default": None, "metavar": "YAML",
                                     "help": "YAML config (default: none, the built-in settings)"}),
    "set": Option(("--set",), {"dest": "overrides", "action": "append", "default": [], "metavar": "KEY=VALUE",
                               "help": "override a config key, e.g. --set data.root=../shared/data/camvid; values are "
                                       "YAML (repeatable)"}),
    "run_dir": Option(("--run-dir",), {"type": Path, "default": None, "metavar": "DIR",
                                       "help": f"output folder ({_config_default('run_dir')})"}, key="run_dir"),
    "resume": Option(("--resume",), {"action": "store_true",
                                     "help": "continue the run in the run folder from its last complete checkpoint "
                                             "(bit-exact; from step 0 when it stopped before the first one)"}),
    "overwrite": Option(("--overwrite",), {"action": "store_true",
                                           "help": "discard checkpoints already in the run folder"}),
    "device": Option(("--device",), {"choices": DEVICES, "default": None,
                                     "help": "where to run: auto picks CUDA when available (default: the config's "
                                             "device, or auto)"}, key="device"),
    "precision": Option(("--precision",), {"choices": PRECISIONS, "default": None,
                                           "help": "bf16 autocast (fast on AMX CPUs and GPUs) or full fp32 (default: "
                                                   "the config's precision, or bf16)"}, key="precision"),
    "report": Option(("--report",), {"action": argparse.BooleanOptionalAction, "default": True,
                                     "help": "write RUN_DIR/report.html (metrics, curves, predictions) when training "
                                             "ends; --no-report skips it"}),
    # -- what a run starts from / trains on ---------------------------------------------------
    "init": Option(("--init",), {"type": str, "default": None, "metavar": "WEIGHTS",
                                 "help": "initialise the encoder / backbone from a model folder, a pretraining run, a "
                                         "checkpoint file or a weights name such as mobilenet_v2_imagenet "
                                         "(default: the config's init, none); ignored with --resume"},
                   key="model.init"),
    "backbone": Option(("--backbone",), {"default": None, "metavar": "VIT",
                                         "help": "ViT backbone: labelwise_default, a DINO / DINOv2 name or a "
                                                 "checkpoint path (default: the config's backbone, labelwise_default)"},
                       key="backbone"),
    "images": Option(("--images",), {"nargs": "+", "type": Path, "default": None, "metavar": "DIR",
                                     "help": "folders of training images, searched recursively (default: the "
                                             "config's images, or its data training split)"}, key="images"),
    "steps": Option(("--steps",), {"type": int, "default": None,
                                   "help": "training steps of the (one) stage (default: the config's "
                                           "stages.0.steps)"}, key="stages.0.steps"),
    "method": Option(("--method",), {"default": None, "help": "method (default: the config's method)"},
                     key="method"),
    # -- evaluation and prediction ------------------------------------------------------------
    "model": Option(("model",), {"type": Path, "metavar": "MODEL",
                                 "help": "model folder: a run folder, or any folder with model.json + "
                                         "weights.safetensors"}),
    "split": Option(("--split",), {"default": None,
                                   "help": "split to score (camvid / folder: sub-folder name; aerial: tile numbers "
                                           "like 6,7; default: the config's data.val_split)"}),
    "window": Option(("--window",), {"type": int, "default": None, "metavar": "PIXELS",
                                     "help": "sliding-window size for large images, 0 = whole image (default: the "
                                             "model's eval setting)"}),
    "overlap": Option(("--overlap",), {"type": float, "default": None,
                                       "help": "sliding-window overlap fraction in [0, 1) (default: the model's eval "
                                               "setting)"}),
    "flip": Option(("--flip",), {"action": argparse.BooleanOptionalAction, "default": None,
                                 "help": "average with the horizontally mirrored prediction (default: the model's "
                                         "eval setting)"}),
    "crf": Option(("--crf",), {"action": argparse.BooleanOptionalAction, "default": None,
                               "help": "refine predictions with a dense CRF (pydensecrf2; default: off, or the "
                                       "config's eval.crf)"}),
    "match_with": Option(("--match-with",), {"type": Path, "default": None, "metavar": "DIR",
                                             "help": "unsupervised models: map clusters to classes by Hungarian "
                                                     "matching on the labeled images of DIR (images/ + labels/, "
                                                     "classes.json; default: match on the evaluated split itself)"}),
    "class_map": Option(("--class-map",), {"type": Path, "default": None, "metavar": "JSON",
                                           "help": "class map of the --match-with images (default: DIR/classes.json)"}),
    "out": Option(("--out",), {"type": Path, "default": None, "metavar": "DIR",
                               "help": "output folder (default: the command's, see its description)"}),
    "metrics": Option(("--metrics",), {"type": Path, "default": None, "metavar": "FILE",
                                       "help": "also write the metrics JSON to this file"}),
    "alpha": Option(("--alpha",), {"type": float, "default": 0.5, "help": "overlay opacity of the class colors"}),
}

#: Options every training command has.
RUN_OPTIONS = ("config", "set", "run_dir", "resume", "overwrite", "device", "precision", "report")
#: Options every inference command (evaluate, predict) has.
INFERENCE_OPTIONS = ("device", "precision", "window", "overlap", "flip", "crf", "match_with", "class_map")


def add(parser: argparse.ArgumentParser, name: str, key: str | None = None, **changes: Any) -> argparse.Action:
    """Add option ``name`` of :data:`OPTIONS` to ``parser``; ``key`` replaces the config key it
    sets in this command (e.g. ``semi.method``), ``changes`` its argparse keywords (``choices``,
    a command-specific ``help`` or ``default``)."""
    option = OPTIONS[name]
    action = parser.add_argument(*option.flags, **{**option.kwargs, **changes})
    target = key if key is not None else option.key
    if target is not None:
        keys = dict(parser.get_default("_config_keys") or {})
        keys[action.dest] = target
        parser.set_defaults(_config_keys=keys)
    return action


def add_run_options(parser: argparse.ArgumentParser, *names: str, **keys: str) -> None:
    """The run options (:data:`RUN_OPTIONS`, or ``names``) with their usual config keys; ``keys``
    maps an option name to another key in this command."""
    for name in names or RUN_OPTIONS:
        add(parser, name, key=keys.get(name))


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides followed by ``key=value`` for every option given on the command line
    that sets a config key (values JSON-encoded, which YAML reads back unchanged)."""
    overrides = list(getattr(args, "overrides", None) or [])
    for dest, key in (getattr(args, "_config_keys", None) or {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(_plain(value))}")
    return overrides
