"""``labelwise demo``: every regime on the embedded synthetic data, one comparison report.

The same synthetic set (256 training and 16 validation images of 96 x 128 pixels, 5 classes,
generated from a seed: no download) is segmented four ways, each from less supervision:

- ``supervised``: a small U-Net on every training mask (:func:`labelwise.methods.supervised.demo`,
  which also writes the validation images and their predictions as PNGs);
- ``semi``: the same U-Net from the masks of 8 training images plus the other 248 images
  unlabeled (FixMatch);
- ``weak``: only each training image's tags (which classes it shows): the multi-class-token ViT
  on the packaged default backbone (``steps / 2`` steps at 224 x 304, the ``weak_synthetic``
  recipe's resolution and learning rates), its CAMs -> pseudo-masks -> the U-Net;
- ``unsupervised``: no label at all: k-means on the default backbone's patch features, clusters
  matched to classes for scoring only.

Then ``run_dir/report.html`` compares them (:mod:`labelwise.report.html`) and each run folder
gets its own ``report.html``. 278 s on 2 CPU cores at the default 300 steps (measured:
BENCHMARKS.md, ``demo``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from labelwise.config import load_config

__all__ = ["REGIMES", "DemoResult", "run_demo"]

REGIMES = ("supervised", "semi", "weak", "unsupervised")
#: The synthetic data every regime of the demo uses (``data.*`` overrides).
DATA = ["data.dataset=synthetic", "data.synthetic_train_images=256", "data.synthetic_val_images=16"]
#: Masks the semi-supervised run may read: this many training images.
SEMI_LABELED = 8


@dataclass
class DemoResult:
    """Run folders by regime, their validation metrics, seconds each took, and the report."""

    run_dir: Path
    runs: dict[str, Path]
    metrics: dict[str, dict[str, Any]]
    seconds: dict[str, float]
    report: Path


def _supervised(run_dir: Path, steps: int, device: str, precision: str, progress: bool) -> dict[str, Any]:
    from labelwise.methods import supervised

    return supervised.demo(run_dir, steps=steps, device=device, precision=precision, progress=progress, quiet=True)


def _semi(run_dir: Path, steps: int, device: str, precision: str, progress: bool) -> dict[str, Any]:
    from labelwise.data.build import build_datasets
    from labelwise.data.splits import dataset_names, split_labeled, write_split
    from labelwise.methods import semi

    base = load_config(semi.SemiConfig, None, [*DATA, "semi.method=supervised_only"])
    names = dataset_names(build_datasets(base.data).train)
    labeled, unlabeled = write_split(run_dir / "split", split_labeled(names, count=SEMI_LABELED, seed=0))
    config = load_config(semi.SemiConfig, None, [
        *DATA, f"data.train_list={labeled}", f"semi.unlabeled_list={unlabeled}", "semi.method=fixmatch",
        "semi.threshold=0.9", "data.batch_size=4", "model.options={width: 16, depth: 3}", "loss.terms=[{name: ce}, "
        "{name: dice, weight: 0.5}]", f"stages=[{{steps: {steps}, lr: 0.003, schedule: poly, warmup_steps: "
        f"{min(20, steps // 10)}, augment: {{hflip: 0.5, scale: [0.8, 1.25], brightness: 0.2, contrast: 0.2}}}}]",
        f"run_dir={run_dir}", f"device={device}", f"precision={precision}", f"progress={str(progress).lower()}",
        f"checkpoint_every={max(steps // 2, 1)}", "log_every=10"])
    return semi.train(config, overwrite=True).metrics


def _weak(run_dir: Path, steps: int, device: str, precision: str, progress: bool) -> dict[str, Any]:
    from labelwise.methods import weak

    classifier_steps = max(steps // 2, 1)
    config = load_config(weak.WeakConfig, None, [
        *DATA, "data.synthetic_size=[96, 128]", "backbone=labelwise_default", "image_size=[224, 304]",
        f"stages.0.steps={classifier_steps}", "batch_size=16", "cams.scales=[2.34]", "cams.flip=false",
        "pseudo_masks.background_class=0",
        f"segmenter_overrides=[\"stages.0.steps={steps}\", \"data.batch_size=8\", \"model.options={{width: 16}}\", "
        f"\"checkpoint_every={max(steps // 2, 1)}\", \"log_every=10\"]",
        f"run_dir={run_dir}", f"device={device}", f"precision={precision}", f"progress={str(progress).lower()}",
        "log_every=10", f"checkpoint_every={max(classifier_steps, 1)}"])
    report = weak.run(config, overwrite=True)
    return report.get("final") or {}


def _unsupervised(run_dir: Path, steps: int, device: str, precision: str, progress: bool) -> dict[str, Any]:
    from labelwise.methods import unsupervised

    config = load_config(unsupervised.UnsupervisedConfig, None, [
        *DATA, "method=kmeans", "features.backbone=labelwise_default", "features.crop_mode=whole",
        "features.crop_size=128", f"features.cache_dir={run_dir / 'feature_cache'}", "eval.linear_probe=false",
        f"run_dir={run_dir}", f"device={device}", f"precision={precision}", f"progress={str(progress).lower()}"])
    unsupervised.train(config, overwrite=True)
    return {}  # scored by the report's prediction pass (Hungarian matching of clusters to classes)


STEPS = {"supervised": _supervised, "semi": _semi, "weak": _weak, "unsupervised": _unsupervised}


def run_demo(run_dir: str | Path = "runs/demo", steps: int = 300, device: str = "auto", precision: str = "bf16",
             progress: bool = True, regimes: Sequence[str] = REGIMES) -> DemoResult:
    """Run ``regimes`` (module docstring) into ``run_dir/<regime>`` (each from scratch) and write
    ``run_dir/report.html``; returns the folders, metrics and seconds, also printed as JSON."""
    from labelwise.errors import ConfigError
    from labelwise.io.atomic import atomic_write_text
    from labelwise.report.html import ReportOptions, build_report, render_html

    unknown = [r for r in regimes if r not in STEPS]
    if unknown or not regimes:
        raise ConfigError(f"regimes: expected some of {list(REGIMES)}, got {list(regimes)}")
    if steps < 1:
        raise ConfigError(f"steps: must be >= 1, got {steps}")
    root = Path(run_dir)
    runs: dict[str, Path] = {}
    metrics: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    reports = []
    options = ReportOptions(device=device, precision=precision)
    for regime in regimes:
        start = time.perf_counter()
        folder = root / regime
        metrics[regime] = STEPS[regime](folder, steps, device, precision, progress)
        (report,) = build_report([folder], options)
        if not metrics[regime] and report.predictions is not None:
            metrics[regime] = report.predictions.metrics
        atomic_write_text(folder / "report.html", render_html([report], f"labelwise demo: {regime}"))
        reports.append(report)
        runs[regime], seconds[regime] = folder, round(time.perf_counter() - start, 1)
        if progress:
            print(f"demo: {regime} done in {seconds[regime]:.0f} s, val mIoU {metrics[regime].get('miou')}",
                  flush=True)
    path = root / "report.html"
    atomic_write_text(path, render_html(reports, "labelwise demo: one synthetic dataset, four kinds of supervision"))
    summary = {"report": str(path), "seconds": seconds,
               "miou": {regime: metrics[regime].get("miou") for regime in runs},
               "runs": {regime: str(folder) for regime, folder in runs.items()}}
    print(json.dumps(summary, indent=2))
    return DemoResult(root, runs, metrics, seconds, path)
