"""The command line: help texts, the demo end to end, evaluate / predict on its output, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from labelwise.cli import build_parser, main


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "demo"])
def test_help_explains_every_option_with_default(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001
    for action in sub._actions:  # noqa: SLF001
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            assert any(opt in text for opt in action.option_strings)
    assert "default" in text


def test_demo_end_to_end_then_evaluate_and_predict(tmp_path, capsys):
    """Every regime at a few steps: each run folder is complete, the comparison report lists them,
    and the supervised model is evaluated and predicts through the ordinary commands."""
    root = tmp_path / "demo"
    assert main(["demo", "--run-dir", str(root), "--steps", "12", "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["miou"]) == {"supervised", "semi", "weak", "unsupervised"}
    assert all(0.0 <= value <= 1.0 for value in summary["miou"].values())
    for regime in summary["miou"]:
        assert (root / regime / "model.json").is_file() and (root / regime / "report.html").is_file(), regime
    comparison = (root / "report.html").read_text()
    assert "<h2>Comparison</h2>" in comparison and comparison.count("<section ") == 4
    run_dir = root / "supervised"
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert summary["miou"]["supervised"] == metrics["miou"]
    assert json.loads((root / "weak" / "weak_run.json").read_text())["final"]["miou"] == summary["miou"]["weak"]
    for kind in ("ids", "color", "overlay"):
        files = sorted((run_dir / "predictions" / kind).glob("*.png"))
        assert len(files) == 16, kind
    ids = np.asarray(Image.open(sorted((run_dir / "predictions" / "ids").glob("*.png"))[0]))
    assert ids.ndim == 2 and ids.max() < 5
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "config.yaml").exists()

    out = tmp_path / "m.json"
    assert main(["evaluate", str(run_dir), "--device", "cpu", "--metrics", str(out)]) == 0
    again = json.loads(out.read_text())
    # same weights; bf16 kernels differ slightly between the NHWC (trained) and NCHW (loaded) layouts
    assert again["miou"] == pytest.approx(metrics["miou"], abs=2e-3)

    pred_dir = tmp_path / "pred"
    image = sorted((run_dir / "images").glob("*.png"))[0]
    assert main(["predict", str(run_dir), str(image), "--out", str(pred_dir), "--device", "cpu",
                 "--window", "32", "--overlap", "0.25"]) == 0
    assert (pred_dir / "overlay" / image.name).exists()


def test_config_error_exit_code_and_message(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  learning_rate: 0.1\n")
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert "optim.learning_rate" in capsys.readouterr().err


def test_predict_missing_input_is_named(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nomodel"), str(tmp_path / "nothing.png")]) == 2
    assert "model.json" in capsys.readouterr().err
