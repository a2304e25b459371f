"""Print the results JSON files as markdown tables (pasted into BENCHMARKS.md).

Run from the project root: `.venv/bin/python benchmarks/tables.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def fmt(value: object) -> str:
    if isinstance(value, float) and 0 < abs(value) < 1e-2:
        return f"{value:.1e}"
    if isinstance(value, float):
        return f"{value:.3f}" if value <= 1.0 else f"{value:.1f}"
    return "" if value is None else str(value)


def short(commit: str) -> str:
    sha, _, suffix = commit.partition("+")
    return sha[:12] + ("+" + suffix if suffix else "")


def table(payload: dict) -> str:
    rows = payload["rows"]
    keys = [k for k in ("fraction", "labeled_images", "method", "encoder", "encoder_weights", "padding", "implementation", "dataset", "split", "arch", "patch", "backbone", "crf",
                        "precision", "miou", "pixel_acc", "mean_acc", "linear_miou", "selection", "seconds_per_step",
                        "peak_rss_gb", "loss", "relative_difference", "speedup", "matmul_fraction", "status",
                        "train_seconds", "images_per_second", "forward_images_per_second",
                        "pipeline_images_per_second", "pipeline_one_worker_images_per_second",
                        "pipeline_over_forward", "top1", "top1_among_10", "images", "epochs", "steps", "checkpoint", "eval",
                        "commit") if any(k in r for r in rows)]
    lines = [f"### {payload['benchmark']}", "",
             f"`{payload['command']}` — commit `{short(payload['commit'])}`, {payload['device']}, "
             f"{payload['torch_threads']} threads, {payload['date']}", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:g}" if k == "fraction" and row.get(k) is not None
                                      else short(row[k]) if k == "commit" and row.get(k) else fmt(row.get(k))
                                      for k in keys) + " |")
    per_class = [r for r in rows if isinstance(r.get("per_class_iou"), dict)]
    if per_class:
        names = list(per_class[0]["per_class_iou"])
        lines += ["", "| per-class IoU | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for row in per_class:
            label = " ".join(str(row.get(k, "")) for k in ("fraction", "method", "encoder", "encoder_weights", "backbone",
                                                            "eval") if row.get(k) and row.get(k) != "none")
            label += " +crf" if row.get("crf") else ""
            lines.append(f"| {label} | " + " | ".join(fmt(row['per_class_iou'][n]) for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        print(table(json.loads(path.read_text())))
        print()


if __name__ == "__main__":
    main()
