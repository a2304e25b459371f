"""The report's plots, drawn by matplotlib (Agg backend, no display) and returned as SVG text.

Each figure is its own SVG document (the HTML embeds it as a ``data:`` image), so the element ids
matplotlib writes never collide between figures; text stays text (``svg.fonttype: none``), drawn
with the viewer's own sans-serif font, so nothing is fetched.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["confusion_svg", "curves_svg", "iou_bars_svg", "curve_keys"]

#: Log fields that are positions in training, not curves.
NOT_CURVES = frozenset({"step", "stage", "epoch", "elapsed_seconds", "round"})


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _svg(figure: Any) -> str:
    plt = _pyplot()
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "labelwise"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    return buffer.getvalue()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The numeric fields of a training log ``rows`` (``metrics.jsonl``) worth a curve, in the
    order they first appear: every key with a finite number in some row, except positions
    (:data:`NOT_CURVES`)."""
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in NOT_CURVES and key not in keys and _finite(value):
                keys.append(key)
    return keys


def curves_svg(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None, columns: int = 3,
               title: str | None = None) -> str | None:
    """Small multiples of a training log: one panel per field of ``keys`` (default
    :func:`curve_keys`: every loss term, lr, images/s and the regime's own diagnostics) against
    ``step`` (row position when a row has none). None when there is nothing to plot."""
    keys = list(keys) if keys is not None else curve_keys(rows)
    if not rows or not keys:
        return None
    plt = _pyplot()
    columns = max(1, min(columns, len(keys)))
    lines = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 2.3 * lines), squeeze=False)
    for index, key in enumerate(keys):
        ax = axes[index // columns][index % columns]
        points = [(row.get("step", position), row[key]) for position, row in enumerate(rows)
                  if _finite(row.get(key))]
        steps, values = zip(*points) if points else ((), ())
        ax.plot(steps, values, linewidth=1.2, color="#1f77b4", marker="." if len(points) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if key == "lr" or key.endswith("_lr"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for index in range(len(keys), lines * columns):
        axes[index // columns][index % columns].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _svg(figure)


def iou_bars_svg(per_class: Mapping[str, float | None], colors: Sequence[Sequence[int]] | None = None,
                 reference: float | None = None, label: str = "IoU", reference_label: str = "mIoU") -> str:
    """Horizontal bars of per-class values in [0, 1] (IoU by default; classes with no value drawn
    empty, marked "n/a"), each bar in its class's display color (``colors``, RGB 0-255) and
    labelled with its value; ``reference`` (e.g. the mIoU) as a dashed line."""
    plt = _pyplot()
    names = list(per_class)
    figure, ax = plt.subplots(figsize=(5.5, 0.32 * len(names) + 0.8))
    values = [per_class[name] for name in names]
    heights = [v if v is not None else 0.0 for v in values]
    fill = [tuple(c / 255 for c in colors[i]) if colors is not None else "#1f77b4" for i in range(len(names))]
    positions = np.arange(len(names))
    ax.barh(positions, heights, color=fill, edgecolor="#333333", linewidth=0.5)
    for position, value in zip(positions, values):
        ax.text((value or 0.0) + 0.01, position, "n/a" if value is None else f"{value:.3f}", va="center", fontsize=8)
    ax.set_yticks(positions, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(label, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    if reference is not None and math.isfinite(reference):
        ax.axvline(reference, color="#d62728", linestyle="--", linewidth=1, label=f"{reference_label} {reference:.3f}")
        ax.legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)  # above the bars
    figure.tight_layout()
    return _svg(figure)


def confusion_svg(matrix: np.ndarray, names: Sequence[str], predicted_names: Sequence[str] | None = None) -> str:
    """Heat map of a confusion matrix ``[C, K]`` (rows: ground-truth class, columns: prediction)
    with every row normalised to sum to 1 (an empty row stays 0); class names on both axes, the
    share written in each cell when there are at most 20 columns."""
    plt = _pyplot()
    counts = np.asarray(matrix, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    columns = list(predicted_names) if predicted_names is not None else list(names)
    size = 0.45 * max(len(names), len(columns)) + 2.0
    figure, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(np.arange(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(names)), list(names), fontsize=8)
    ax.set_xlabel("predicted", fontsize=9)
    ax.set_ylabel("ground truth", fontsize=9)
    if len(columns) <= 20:
        for row in range(shares.shape[0]):
            for column in range(shares.shape[1]):
                value = shares[row, column]
                if value >= 0.005:
                    ax.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    figure.tight_layout()
    return _svg(figure)
