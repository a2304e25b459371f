"""``labelwise report``: one self-contained HTML file for one or more run folders.

Everything is inside the file: plots are SVG documents and images PNGs, both embedded as
``data:`` URIs; the styling is one inline stylesheet; there is no script and nothing is fetched.
Per run: provenance (command, commit, date, data, encoder / backbone and its weights, the config),
the validation metrics the run wrote with per-class IoU bars, the confusion matrix (rows
normalised), the training curves of every log, the stage scores of a weak run with the CAMs of
each tagged class and the pseudo-masks of its first training images, and a
prediction grid (image / ground truth / prediction / overlay) of the best and worst images by
their own mIoU, with the cluster -> class mapping for unsupervised runs. Several runs add a
comparison table first.

    from labelwise.report.html import ReportOptions, write_report
    write_report(["runs/demo", "runs/weak"], "report.html")
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from labelwise.data.classmap import ClassMap
from labelwise.errors import ConfigError
from labelwise.io.atomic import atomic_write_text
from labelwise.report.figures import confusion_svg, curves_svg, iou_bars_svg
from labelwise.report.png import overlay
from labelwise.report.predictions import ImagePanel, PredictionSummary, summarise_predictions
from labelwise.report.run_record import RunRecord, read_run

__all__ = ["ReportOptions", "RunReport", "build_report", "render_html", "write_report"]

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1200px;color:#222;
line-height:1.4;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:0.8em;max-height:400px}
img.plot{max-width:100%;height:auto}figure{margin:8px 0}.grid img{width:100%;height:auto;image-rendering:pixelated}
.grid td{width:24%}
.cams img{max-width:200px;height:auto}figcaption{font-size:0.8em;color:#555}.note{color:#666;font-size:0.9em}
.swatch{display:inline-block;width:12px;height:12px;
margin-right:4px;border:1px solid #555;vertical-align:middle}
"""


#: What each regime learns from, for the comparison table.
SUPERVISION = {"supervised": "every training mask", "semi": "a labeled subset + unlabeled images",
               "weak": "image-level tags", "unsupervised": "none (clusters matched for scoring only)",
               "pretrain": "none"}


@dataclass
class ReportOptions:
    """What :func:`build_report` adds beyond the files of the run folders.

    ``predictions``: run the model over a labeled split for the confusion matrix and the image
    grid (off: only what the folders hold). ``data_config``: the YAML whose ``data`` section
    names that split (default: each run's own ``config.yaml``), ``data_overrides`` (``data.*``
    ``KEY=VALUE``), ``split`` (default: the config's validation split). ``images``: how many best
    and worst images the grid shows. ``limit``: predict at most this many images of the split.
    ``device``, ``precision``: for the predictions."""

    predictions: bool = True
    data_config: str | None = None
    data_overrides: list[str] = field(default_factory=list)
    split: str | None = None
    images: int = 3
    limit: int | None = None
    device: str = "auto"
    precision: str = "bf16"


@dataclass
class RunReport:
    """A run and what the report computed for it: the prediction pass (None when it was off or
    impossible, with the reason in ``note``)."""

    record: RunRecord
    predictions: PredictionSummary | None = None
    note: str | None = None


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else _esc(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _svg_img(svg: str, alt: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<figure><img class="plot" alt="{_esc(alt)}" src="data:image/svg+xml;base64,{data}"></figure>'


def _png_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _key_values(rows: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _describe_source(source: Any) -> str:
    if not isinstance(source, dict) or not source:
        return "n/a"
    return ", ".join(f"{_esc(k)}: {_esc(v)}" for k, v in source.items() if v is not None) or "n/a"


def _config_data(text: str | None) -> dict[str, Any]:
    """The ``data`` section of a run's ``config.yaml`` text ({} when there is none)."""
    import yaml

    try:
        loaded = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    data = loaded.get("data") if isinstance(loaded, dict) else None
    return data if isinstance(data, dict) else {}


def _provenance(record: RunRecord) -> str:
    prov = record.provenance
    data = prov.get("data") or _config_data(record.config_text)
    data_text = ", ".join(f"{k}: {data[k]}" for k in ("dataset", "root", "train_split", "val_split", "images")
                          if isinstance(data, dict) and data.get(k) not in (None, [], ""))
    architecture = prov.get("architecture") or {}
    arch_text = (architecture.get("name") or architecture.get("segmenter", {}).get("name")
                 if isinstance(architecture, dict) else None)
    rows = [("folder", _esc(record.folder)), ("regime", _esc(record.regime)),
            ("model kind", _esc(record.info.get("kind", "n/a"))), ("architecture", _esc(arch_text or "n/a")),
            ("encoder / backbone and weights", _describe_source(prov.get("source"))),
            ("command", f"<code>{_esc(prov.get('command') or 'n/a')}</code>"),
            ("commit", _esc(prov.get("commit") or "n/a")), ("date", _esc(prov.get("date") or "n/a")),
            ("labelwise version", _esc(prov.get("labelwise_version") or record.info.get("labelwise_version")
                                       or "n/a")),
            ("data", _esc(data_text or "n/a"))]
    out = "<h3>Provenance</h3>" + _key_values(rows)
    if record.config_text:
        out += f"<details><summary>config.yaml</summary><pre>{_esc(record.config_text)}</pre></details>"
    return out


def _class_colors(record: RunRecord, names: Sequence[str]) -> list[tuple[int, int, int]] | None:
    try:
        class_map = ClassMap.from_dict(record.info.get("class_map") or {}, where=str(record.folder))
    except (ConfigError, KeyError, TypeError, ValueError):  # no usable class map: bars in one color
        return None
    if list(class_map.names) != list(names):
        return None
    return [tuple(int(c) for c in color) for color in class_map.colors]  # type: ignore[misc]


def _metrics_section(report: RunReport) -> str:
    record = report.record
    metrics = record.metrics
    source = record.metrics_source
    if metrics is None and report.predictions is not None:
        metrics, source = report.predictions.metrics, "computed by this report (no eval.json in the folder)"
    if not metrics:
        return "<h3>Metrics</h3><p class='note'>The run wrote no validation metrics.</p>"
    rows = [(key, f"<span data-metric='{_esc(key)}'>{_number(metrics.get(key))}</span>")
            for key in ("miou", "pixel_acc", "mean_acc", "mean_f1", "freq_weighted_iou") if key in metrics]
    if metrics.get("split"):
        rows.append(("split", _esc(metrics["split"])))
    out = f"<h3>Metrics</h3><p class='note'>from {_esc(source)}</p>" + _key_values(rows)
    per_class = metrics.get("per_class_iou")
    if isinstance(per_class, dict) and per_class:
        miou = metrics.get("miou")
        out += _svg_img(iou_bars_svg(per_class, _class_colors(record, list(per_class)),
                                     miou if isinstance(miou, (int, float)) else None), "per-class IoU")
        head = "".join(f"<th>{_esc(name)}</th>" for name in per_class)
        cells = "".join(f"<td class='num' data-class-iou='{_esc(name)}'>{_number(value)}</td>"
                        for name, value in per_class.items())
        out += f"<table class='per-class'><tr><th>per-class IoU</th>{head}</tr><tr><td></td>{cells}</tr></table>"
    return out


def _evaluations_section(record: RunRecord) -> str:
    """The scores ``labelwise evaluate --report`` added to the run folder."""
    if not record.evaluations:
        return ""
    names: list[str] = []
    for entry in record.evaluations:
        for name in (entry.get("metrics") or {}).get("per_class_iou") or {}:
            if name not in names:
                names.append(name)
    head = "".join(f"<th>{_esc(n)}</th>" for n in ["split", "dataset", "root", "CRF", "date", "mIoU", "pixel acc",
                                                    *names])
    body = ""
    for entry in record.evaluations:
        metrics = entry.get("metrics") or {}
        per_class = metrics.get("per_class_iou") or {}
        cells = [_esc(entry.get(k) if entry.get(k) is not None else "n/a") for k in ("split", "dataset", "root")]
        cells += [_esc("yes" if entry.get("crf") else "no"), _esc(entry.get("date") or "n/a")]
        row = "".join(f"<td>{c}</td>" for c in cells)
        row += "".join(f"<td class='num' data-evaluation='{_esc(k)}'>{_number(metrics.get(k))}</td>"
                       for k in ("miou", "pixel_acc"))
        row += "".join(f"<td class='num'>{_number(per_class.get(n))}</td>" for n in names)
        body += f"<tr>{row}</tr>"
    return (f"<h3>Evaluations</h3><p class='note'>added by <code>labelwise evaluate --report</code></p>"
            f"<table class='evaluations'><tr>{head}</tr>{body}</table>")


def _stages_section(record: RunRecord) -> str:
    stages = record.stages
    if not stages or record.regime != "weak":
        return ""
    rows: list[tuple[str, Any, Any, Any]] = []
    pseudo = stages.get("pseudo_masks") or {}
    for key, label in (("cams", "CAMs (training images)"), ("cams_refined", "refined CAMs (training images)"),
                       ("pseudo_masks", "pseudo-masks (training images, kept pixels)")):
        if isinstance(pseudo.get(key), dict):
            rows.append((label, pseudo[key].get("miou"), pseudo[key].get("pixel_acc"),
                         pseudo[key].get("kept_fraction")))
    if isinstance(stages.get("final"), dict):
        rows.append(("segmenter on the pseudo-masks (validation)", stages["final"].get("miou"),
                     stages["final"].get("pixel_acc"), None))
    for entry in stages.get("self_training") or []:
        labels = (entry.get("pseudo_labels") or {})
        if isinstance(labels.get("pseudo_labels"), dict):
            rows.append((f"self-training round {entry.get('round')}: labels (training images, kept pixels)",
                         labels["pseudo_labels"].get("miou"), labels["pseudo_labels"].get("pixel_acc"),
                         labels.get("kept_fraction")))
        if isinstance(entry.get("final"), dict):
            rows.append((f"self-training round {entry.get('round')}: segmenter (validation)",
                         entry["final"].get("miou"), entry["final"].get("pixel_acc"), None))
    if not rows:
        return ""
    body = "".join(f"<tr><td>{_esc(label)}</td><td class='num'>{_number(m)}</td><td class='num'>{_number(a)}</td>"
                   f"<td class='num'>{_number(k, 3)}</td></tr>" for label, m, a, k in rows)
    return ("<h3>Stages</h3><table><tr><th>stage</th><th>mIoU</th><th>pixel acc</th><th>kept</th></tr>"
            f"{body}</table>")


def _heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A grey heat map ``[H, W]`` uint8 in the ``jet`` colormap blended over ``image``."""
    import matplotlib

    colored = (matplotlib.colormaps["jet"](heat.astype(np.float64) / 255.0)[..., :3] * 255).astype(np.uint8)
    if colored.shape[:2] != image.shape[:2]:
        colored = np.asarray(Image.fromarray(colored).resize((image.shape[1], image.shape[0]), Image.BILINEAR))
    return overlay(image, colored, alpha)


def _weak_cams_section(record: RunRecord) -> str:
    """The CAMs a weak run kept (``pseudo_masks/cams/<image>/<class>.png``) next to each image and
    its pseudo-mask (``pseudo_masks/pseudo/train/{images,labels}``)."""
    root = record.folder / "pseudo_masks"
    cams = sorted(p for p in (root / "cams").glob("*") if p.is_dir()) if (root / "cams").is_dir() else []
    if record.regime != "weak" or not cams:
        return ""
    try:
        class_map = ClassMap.from_dict(record.info.get("class_map") or {}, where=str(record.folder / "model.json"))
    except (ConfigError, KeyError, TypeError, ValueError):
        return ""
    rows = ""
    for folder in cams[:4]:
        image_path = root / "pseudo" / "train" / "images" / f"{folder.name}.png"
        labels_path = root / "pseudo" / "train" / "labels" / f"{folder.name}.png"
        if not image_path.is_file():
            continue
        try:
            image = np.asarray(Image.open(image_path).convert("RGB"))
            cells = [("image", image)]
            if labels_path.is_file():
                cells.append(("pseudo-mask (black: ignored)", class_map.colorize(np.asarray(Image.open(labels_path)))))
            for heat_path in sorted(folder.glob("*.png")):
                heat = np.asarray(Image.open(heat_path).convert("L"))
                cells.append((f"CAM: {heat_path.stem}", _heat_overlay(image, heat)))
        except (OSError, ValueError, IndexError):  # a damaged PNG in the run folder: leave the row out
            continue
        images = "".join(f"<td><figure><img alt='{_esc(label)} {_esc(folder.name)}' src='{_png_uri(array)}'>"
                         f"<figcaption>{_esc(label)}</figcaption></figure></td>" for label, array in cells)
        rows += f"<tr><th>{_esc(folder.name)}</th>{images}</tr>"
    if not rows:
        return ""
    return ("<h3>CAMs and pseudo-masks</h3><p class='note'>first training images; each tagged class's activation map "
            f"(refined when the run refines them) over the image</p><table class='cams'>{rows}</table>")


def _curves_section(record: RunRecord) -> str:
    parts = []
    for log in record.logs:
        svg = curves_svg(log.rows, title=log.name or None)
        if svg is not None:
            parts.append(_svg_img(svg, f"training curves {log.name or record.name}"))
    if not parts:
        return "<h3>Training curves</h3><p class='note'>No training log in the folder.</p>"
    return "<h3>Training curves</h3>" + "".join(parts)


def _panel_row(panel: ImagePanel, class_map: ClassMap) -> str:
    truth = class_map.colorize(panel.truth)
    prediction = class_map.colorize(panel.prediction)
    cells = [("image", panel.image), ("ground truth", truth), ("prediction", prediction),
             ("overlay", overlay(panel.image, prediction))]
    images = "".join(f"<td><img alt='{_esc(label)} {_esc(panel.name)}' src='{_png_uri(array)}'></td>"
                     for label, array in cells)
    return (f"<tr><th colspan='4'>{_esc(panel.name)}: mIoU {_number(panel.miou, 3)}</th></tr>"
            f"<tr>{images}</tr>")


def _predictions_section(report: RunReport) -> str:
    summary = report.predictions
    if summary is None:
        return f"<h3>Predictions</h3><p class='note'>{_esc(report.note or 'not computed')}</p>" if report.note else ""
    class_map = summary.class_map
    names = list(class_map.names)
    out = (f"<h3>Confusion matrix</h3><p class='note'>{summary.images} images, rows (ground truth) normalised; "
           f"mIoU of this pass {_number(summary.metrics.get('miou'))}</p>")
    out += _svg_img(confusion_svg(summary.confusion, names), "confusion matrix")
    if summary.mapping is not None:
        total = max(1, sum(summary.output_pixels or []))
        sizes = summary.output_pixels or [0] * len(summary.mapping)
        rows = "".join(f"<tr><td>{_esc(cluster)}</td><td>{_esc(names[c])}</td><td class='num'>{size / total:.3f}</td>"
                       "</tr>" for cluster, c, size in zip(summary.output_names, summary.mapping, sizes))
        out += ("<h3>Cluster → class mapping</h3><p class='note'>Hungarian matching on this split's pixels "
                "(evaluation only); share: the cluster's size, as a share of the split's labeled pixels</p>"
                f"<table><tr><th>cluster</th><th>class</th><th>share</th></tr>{rows}</table>")
        shares = {f"{cluster} → {names[c]}": size / total
                  for cluster, c, size in zip(summary.output_names, summary.mapping, sizes)}
        out += _svg_img(iou_bars_svg(shares, [class_map.colors[c] for c in summary.mapping],
                                     reference=1.0 / len(shares), label="share of pixels",
                                     reference_label="uniform"), "cluster sizes")
    legend = "".join(f"<span><span class='swatch' style='background:rgb{tuple(color)}'></span>{_esc(name)}</span> "
                     for name, color in zip(names, class_map.colors))
    header = "<tr><th>image</th><th>ground truth</th><th>prediction</th><th>overlay</th></tr>"
    for title, panels in (("Best images", summary.best), ("Worst images", summary.worst)):
        if panels:
            rows = "".join(_panel_row(panel, class_map) for panel in panels)
            out += f"<h3>{title} (by their own mIoU)</h3><p>{legend}</p><table class='grid'>{header}{rows}</table>"
    return out


def _comparison(reports: Sequence[RunReport]) -> str:
    def metric_of(report: RunReport) -> dict[str, Any]:
        if report.record.metrics:
            return report.record.metrics
        return report.predictions.metrics if report.predictions is not None else {}

    per_class_names = [list((metric_of(r).get("per_class_iou") or {}).keys()) for r in reports]
    shared = per_class_names[0] if per_class_names and all(n == per_class_names[0] for n in per_class_names) else []
    head = "".join(f"<th>{_esc(n)}</th>" for n in ["run", "regime", "labels used", "mIoU", "pixel acc", "mean acc",
                                                    *shared])
    body = ""
    for report in reports:
        metrics = metric_of(report)
        per_class = metrics.get("per_class_iou") or {}
        cells = [f"<td><a href='#{_anchor(report)}'>{_esc(report.record.name)}</a></td>",
                 f"<td>{_esc(report.record.regime)}</td>",
                 f"<td>{_esc(SUPERVISION.get(report.record.regime, 'n/a'))}</td>"]
        cells += [f"<td class='num'>{_number(metrics.get(k))}</td>" for k in ("miou", "pixel_acc", "mean_acc")]
        cells += [f"<td class='num'>{_number(per_class.get(n))}</td>" for n in shared]
        body += f"<tr>{''.join(cells)}</tr>"
    return f"<h2>Comparison</h2><table class='comparison'><tr>{head}</tr>{body}</table>"


def _anchor(report: RunReport) -> str:
    return "run-" + "".join(c if c.isalnum() else "-" for c in str(report.record.folder))


def render_html(reports: Sequence[RunReport], title: str = "labelwise report") -> str:
    """The report document of ``reports`` (module docstring)."""
    sections = []
    if len(reports) > 1:
        sections.append(_comparison(reports))
    for report in reports:
        record = report.record
        body = (_provenance(record) + _metrics_section(report) + _evaluations_section(record) + _stages_section(record)
                + _weak_cams_section(record) + _predictions_section(report) + _curves_section(record))
        sections.append(f"<section id='{_anchor(report)}' class='run'><h2>{_esc(record.name)} "
                        f"<small>({_esc(record.regime)})</small></h2>{body}</section>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(title)}</title><style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>"
            + "".join(sections) + "</body></html>\n")


def _prediction_pass(record: RunRecord, options: ReportOptions) -> tuple[PredictionSummary | None, str | None]:
    """The prediction pass of one run, or why there is none."""
    from labelwise.config import load_data_config
    from labelwise.data.build import build_eval_dataset
    from labelwise.errors import CheckpointError, DataError
    from labelwise.inference import load

    if record.regime == "pretrain":
        return None, "a pretrained backbone predicts no classes"
    config = options.data_config or (record.folder / "config.yaml" if record.config_text is not None else None)
    try:
        predictor = load(record.folder, device=options.device, precision=options.precision)
        dataset, _ = build_eval_dataset(load_data_config(config, options.data_overrides), options.split)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError) as exc:
        return None, f"no predictions: {exc}"
    if getattr(dataset, "class_map", None) is None:
        return None, "no predictions: the split has no labels"
    return summarise_predictions(predictor, dataset, options.images, limit=options.limit), None


def build_report(run_dirs: Sequence[str | Path], options: ReportOptions | None = None) -> list[RunReport]:
    """Read every run folder and, with ``options.predictions``, run its prediction pass."""
    options = options or ReportOptions()
    reports = []
    for folder in run_dirs:
        record = read_run(folder)
        report = RunReport(record)
        if options.predictions:
            report.predictions, report.note = _prediction_pass(record, options)
        reports.append(report)
    return reports


def write_report(run_dirs: Sequence[str | Path], out: str | Path, options: ReportOptions | None = None,
                 title: str | None = None) -> Path:
    """Write the report of ``run_dirs`` to ``out`` (atomically); returns its path."""
    reports = build_report(run_dirs, options)
    name = title or ("labelwise report: " + ", ".join(r.record.name for r in reports))
    out = Path(out)
    atomic_write_text(out, render_html(reports, name))
    return out
