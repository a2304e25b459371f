"""``labelwise report``: the HTML is self-contained and shows the run's own numbers, the prediction
pass agrees with ``evaluate`` (cluster mapping included) and with per-image confusion counts, the
plots hold what they claim, and damaged logs are errors naming the file and line."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import labelwise
from labelwise.cli import main
from labelwise.config import load_config
from labelwise.data.build import build_eval_dataset
from labelwise.errors import ConfigError
from labelwise.eval.metrics import ConfusionMatrix
from labelwise.inference import evaluate
from labelwise.methods.unsupervised.config import UnsupervisedConfig
from labelwise.report.evaluations import read_evaluations
from labelwise.report.figures import confusion_svg, curve_keys, curves_svg
from labelwise.report.html import ReportOptions, build_report, render_html, write_report
from labelwise.report.predictions import image_miou, summarise_predictions
from labelwise.report.run_record import read_log, read_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def supervised_run(tiny_supervised_run: Path) -> Path:
    return tiny_supervised_run


@pytest.fixture
def cluster_run(tiny_cluster_run: Path) -> Path:
    return tiny_cluster_run


# ----------------------------------------------------------------------------- pieces


def test_image_miou_by_hand() -> None:
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 1]])
    # class 0: tp 1, union 3 (truth 2 + pred 2 - 1); class 1: tp 3, union 4; class 2: tp 1, union 2;
    # class 3: predicted only on the ignored pixel -> absent
    assert image_miou(pred, truth, 4, 255) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert np.isnan(image_miou(pred, np.full_like(truth, 255), 4, 255))


def test_curve_keys_keep_numbers_and_skip_positions() -> None:
    rows = [{"step": 1, "epoch": 0, "loss": 1.0, "lr": 0.1, "note": "x"},
            {"step": 2, "loss": 0.5, "confident_share": 0.3, "flag": True, "elapsed_seconds": 4.0}]
    assert curve_keys(rows) == ["loss", "lr", "confident_share"]
    svg = curves_svg(rows)
    titles = [t.text for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    assert {"loss", "lr", "confident_share"} <= set(titles)
    assert curves_svg([{"step": 1}]) is None


def test_confusion_heatmap_rows_are_normalised_and_named() -> None:
    svg = confusion_svg(np.array([[3, 1, 0], [0, 0, 0], [1, 1, 2]]), ["road", "sky", "car"])
    texts = [t.text for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    assert {"road", "sky", "car"} <= set(texts)
    cells = sorted(t for t in texts if t and re.fullmatch(r"\d\.\d\d", t))
    assert cells == sorted(["0.75", "0.25", "0.25", "0.25", "0.50"])  # the empty row writes nothing


def test_a_damaged_log_names_the_file_and_line(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [row["step"] for row in read_log(log)] == [1, 2]  # a torn last line: the crash point
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"metrics\.jsonl:2"):
        read_log(log)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a run folder"):
        read_run(tmp_path / "empty")


# ----------------------------------------------------------------------------- the prediction pass


def test_cluster_pass_matches_evaluate_and_per_image_counts(cluster_run: Path) -> None:
    predictor = labelwise.load(cluster_run, device="cpu", precision="fp32")
    dataset, _ = build_eval_dataset(load_config(UnsupervisedConfig, cluster_run / "config.yaml").data)
    summary = summarise_predictions(predictor, dataset, count=2)
    reference = evaluate(labelwise.load(cluster_run, device="cpu", precision="fp32"), dataset)
    assert summary.mapping == reference["mapping"]
    assert summary.metrics["miou"] == pytest.approx(reference["miou"], abs=1e-9)
    assert summary.confusion.sum() == reference["num_pixels"]
    panels = summary.best + summary.worst
    assert len(summary.best) == len(summary.worst) == 2
    for panel in panels:  # each panel's score, recomputed from its own pixels with the metrics module
        matrix = ConfusionMatrix(dataset.class_map.num_classes, dataset.class_map.ignore_index)
        matrix.update(torch.from_numpy(panel.prediction).long()[None], torch.from_numpy(panel.truth).long()[None])
        assert panel.miou == pytest.approx(float(matrix.compute().miou), abs=1e-9)
        expected = np.asarray(summary.mapping)[predictor.output_ids(dataset[panel.index]["image"][None])[0].numpy()]
        np.testing.assert_array_equal(panel.prediction, expected)
    assert summary.best[0].miou >= summary.best[1].miou >= summary.worst[1].miou >= summary.worst[0].miou
    sizes = np.zeros(predictor.outputs.num_classes, dtype=np.int64)  # labeled pixels per cluster, by hand
    for index in range(len(dataset)):
        ids = predictor.output_ids(dataset[index]["image"][None])[0].numpy()
        labeled = dataset[index]["mask"].numpy() != dataset.class_map.ignore_index
        sizes += np.bincount(ids[labeled], minlength=len(sizes))
    assert summary.output_pixels == sizes.tolist()


# ----------------------------------------------------------------------------- the document


def _attributes(document: str, name: str) -> list[str]:
    return re.findall(rf"""\b{name}=['"]([^'"]*)['"]""", document)


def test_report_is_self_contained_and_shows_the_runs_numbers(supervised_run: Path, cluster_run: Path,
                                                             tmp_path: Path) -> None:
    out = write_report([supervised_run, cluster_run], tmp_path / "report.html", ReportOptions(device="cpu"))
    document = out.read_text()
    assert "<script" not in document.lower() and "@import" not in document and "url(" not in document
    assert all(src.startswith("data:") for src in _attributes(document, "src"))
    assert all(href.startswith("#") for href in _attributes(document, "href"))
    assert "<h2>Comparison</h2>" in document and "Cluster → class mapping" in document
    for section in ("Provenance", "Metrics", "Confusion matrix", "Training curves", "Best images", "Worst images"):
        assert f"<h3>{section}" in document, section
    evaluation = json.loads((supervised_run / "eval.json").read_text())
    sections = re.findall(r"<section .*?</section>", document, flags=re.S)
    assert len(sections) == 2
    section = next(text for text in sections if str(supervised_run) in text)
    shown = dict(re.findall(r"data-metric='(\w+)'>([^<]+)<", section))
    assert float(shown["miou"]) == pytest.approx(evaluation["miou"], abs=5e-5)
    assert float(shown["pixel_acc"]) == pytest.approx(evaluation["pixel_acc"], abs=5e-5)
    per_class = dict(re.findall(r"data-class-iou='([^']+)'>([^<]+)<", section))
    for name, value in evaluation["per_class_iou"].items():
        assert per_class[name] == ("n/a" if value is None else f"{value:.4f}")
    command = json.loads((supervised_run / "model.json").read_text())["training"]["command"]
    assert command.split()[0] in document


def test_without_predictions_only_the_folder_is_read(supervised_run: Path) -> None:
    reports = build_report([supervised_run], ReportOptions(predictions=False))
    assert reports[0].predictions is None and reports[0].record.regime == "supervised"
    document = render_html(reports)
    assert "Confusion matrix" not in document and "<h3>Training curves" in document


def test_cli_writes_the_report(supervised_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert main(["report", str(supervised_run), "--out", str(out), "--grid-images", "1", "--device", "cpu"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert out.read_text().count("mIoU ") >= 2  # one best and one worst image


# ----------------------------------------------------------------------------- training commands and evaluate


TINY_TRAIN = ["--set", "data.dataset=synthetic", "--set", "data.synthetic_train_images=8", "--set",
              "data.synthetic_val_images=3", "--set", "data.synthetic_size=[32, 48]", "--set",
              "model.options={width: 8, depth: 2}", "--set", "data.batch_size=4", "--set", "log_every=2",
              "--set", "checkpoint_every=4", "--set", "stages.0.steps=4", "--set", "stages.0.warmup_steps=1",
              "--device", "cpu", "--precision", "fp32"]


def test_training_commands_write_a_report_unless_told_not_to(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *TINY_TRAIN, "--run-dir", str(tmp_path / "with")]) == 0
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # stdout stays the metrics JSON
    page = (tmp_path / "with" / "report.html").read_text()
    evaluation = json.loads((tmp_path / "with" / "eval.json").read_text())
    assert re.search(r"data-metric='miou'>([^<]+)<", page).group(1) == f"{evaluation['miou']:.4f}"
    assert main(["train", *TINY_TRAIN, "--run-dir", str(tmp_path / "without"), "--no-report"]) == 0
    assert (tmp_path / "without" / "eval.json").is_file() and not (tmp_path / "without" / "report.html").exists()


def test_evaluate_adds_its_scores_to_the_report(tiny_supervised_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_supervised_run, run)
    for split in ("train", "train", "val"):  # the same split twice: one entry, the latest
        assert main(["evaluate", str(run), "--split", split, "--report", "--device", "cpu",
                     "--precision", "fp32"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    entries = read_evaluations(run)
    assert [e["split"] for e in entries] == ["train", "val"]
    assert entries[-1]["metrics"]["miou"] == pytest.approx(printed["miou"])
    page = (run / "report.html").read_text()
    assert "<h3>Evaluations" in page
    shown = re.findall(r"data-evaluation='miou'>([^<]+)<", page)
    assert shown == [f"{e['metrics']['miou']:.4f}" for e in entries]
