"""The command line declared once: every subcommand has the run / inference options where they
apply, one option name means one thing everywhere, defaults are printed once, and every option
that sets a config key sets a key the command's config has."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from labelwise.cli import build_parser
from labelwise.cli_options import INFERENCE_OPTIONS, OPTIONS, RUN_OPTIONS, config_overrides

TRAINING = ("train", "semi train", "weak train", "weak run", "unsupervised train", "pretrain")
INFERENCE = ("evaluate", "predict")


def _leaves(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix.strip(): parser}
    found: dict[str, argparse.ArgumentParser] = {}
    for name, child in subs[0].choices.items():
        found.update(_leaves(child, f"{prefix} {name}"))
    return found


LEAVES = _leaves(build_parser())


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_every_command_is_found():
    assert set(TRAINING) | set(INFERENCE) | {"demo", "attention", "report", "semi split", "weak cams",
                                            "weak pseudo-masks", "unsupervised probe",
                                            "unsupervised refine"} == set(LEAVES)


@pytest.mark.parametrize("command", TRAINING)
def test_training_commands_have_every_run_option(command):
    expected = {OPTIONS[name].flags[0] for name in RUN_OPTIONS}
    assert expected <= _flags(LEAVES[command]), sorted(expected - _flags(LEAVES[command]))


@pytest.mark.parametrize("command", INFERENCE)
def test_inference_commands_have_every_inference_option(command):
    expected = {OPTIONS[name].flags[0] for name in INFERENCE_OPTIONS}
    assert expected <= _flags(LEAVES[command]), sorted(expected - _flags(LEAVES[command]))


def _meaning(action: argparse.Action) -> tuple:
    return (action.dest, type(action).__name__, action.type, action.nargs,
            tuple(action.choices) if action.choices and OPTIONS_BY_FLAG.get(action.option_strings[0]) != "method"
            else None)


OPTIONS_BY_FLAG = {option.flags[0]: name for name, option in OPTIONS.items()}


def test_one_option_name_means_one_thing_everywhere():
    seen: dict[str, tuple[str, tuple]] = {}
    for command, parser in LEAVES.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                meaning = _meaning(action)
                if flag in seen:
                    first, earlier = seen[flag]
                    assert meaning == earlier, f"{flag}: {command} {meaning} != {first} {earlier}"
                else:
                    seen[flag] = (command, meaning)
    # the options shared by several commands are the declared ones
    shared = {flag for flag in seen if sum(flag in _flags(p) for p in LEAVES.values()) > 1}
    declared = {option.flags[0] for option in OPTIONS.values()} | {"--tags", "--classes", "--batch-size"}
    declared |= {"--no-" + flag[2:] for flag in declared}  # the negative forms of on/off options
    assert shared <= declared, sorted(shared - declared)


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_help_states_each_default_once(command):
    text = LEAVES[command].format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in LEAVES[command]._actions:
        if action.help:
            formatted = LEAVES[command]._get_formatter()._get_help_string(action)
            assert formatted.count("default:") <= 1, (command, action.option_strings, formatted)


def test_top_level_help_is_written_for_users():
    text = build_parser().format_help()
    assert "labelwise train" in text and "labelwise semi train" in text and "labelwise weak run" in text
    assert "labelwise unsupervised train" in text and "labelwise demo" in text
    assert "thin layer" not in text and "kept apart" not in text


CASES = {
    "train": (["--run-dir", "r", "--device", "cpu", "--precision", "fp32", "--init", "mobilenet_v2_imagenet"],
              "labelwise.config:TrainConfig", {"run_dir": "r", "device": "cpu", "precision": "fp32",
                                               "model.init": "mobilenet_v2_imagenet"}),
    "semi train": (["--run-dir", "r", "--device", "cpu", "--precision", "fp32", "--method", "fixmatch",
                    "--init", "w.safetensors", "--unlabeled", "photos"], "labelwise.methods.semi:SemiConfig",
                   {"run_dir": "r", "precision": "fp32", "semi.method": "fixmatch", "model.init": "w.safetensors"}),
    "weak train": (["--run-dir", "r", "--precision", "fp32", "--backbone", "b.safetensors", "--steps", "7",
                    "--images", "imgs", "--tags", "tags.csv"], "labelwise.methods.weak:WeakConfig",
                   {"run_dir": "r", "precision": "fp32", "backbone": "b.safetensors", "stages.0.steps": 7,
                    "images": ["imgs"]}),
    "unsupervised train": (["--run-dir", "r", "--precision", "fp32", "--backbone", "b", "--steps", "5", "--method",
                            "stego", "--clusters", "4"], "labelwise.methods.unsupervised:UnsupervisedConfig",
                           {"run_dir": "r", "precision": "fp32", "features.backbone": "b", "stages.0.steps": 5,
                            "method": "stego", "eval.clusters": 4}),
    "pretrain": (["--run-dir", "r", "--precision", "fp32", "--method", "moco", "--steps", "9", "--images", "a", "b",
                  "--init", "i"], "labelwise.methods.pretrain:PretrainConfig",
                 {"run_dir": "r", "precision": "fp32", "method": "moco", "stages.0.steps": 9, "data.images": ["a", "b"],
                  "init": "i"}),
}


@pytest.mark.parametrize("command", sorted(CASES))
def test_options_set_existing_config_keys(command):
    import importlib

    from labelwise.config import load_config

    argv, target, expected = CASES[command]
    args = build_parser().parse_args([*command.split(), *argv])
    module, name = target.split(":")
    cls = getattr(importlib.import_module(module), name)
    from labelwise import cli_semi, cli_weak

    # the one mapping, plus the options a regime turns into keys itself (list files, tag files)
    overrides = {"semi train": cli_semi._train_overrides, "weak train": cli_weak._overrides}.get(
        command, config_overrides)(args)
    assert overrides[:len(config_overrides(args))] == config_overrides(args)
    with contextlib.redirect_stderr(io.StringIO()):
        config = load_config(cls, None, overrides)
    for key, value in expected.items():
        node = config
        for part in key.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        assert node == value, (key, node, value)
