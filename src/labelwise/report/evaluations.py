"""Scores a run's model got from ``labelwise evaluate --report``, kept in the run folder
(``evaluations.json``) so its report lists them: one entry per (split, data root, dataset, CRF),
the latest replacing an earlier one of the same key."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from labelwise.io.atomic import atomic_write_json
from labelwise.io.jsonfile import read_json

__all__ = ["EVALUATIONS_FILE", "add_evaluation", "read_evaluations"]

EVALUATIONS_FILE = "evaluations.json"


def read_evaluations(run_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``run_dir/evaluations.json`` (none when the file is absent)."""
    path = Path(run_dir) / EVALUATIONS_FILE
    if not path.is_file():
        return []
    entries = read_json(path, "evaluation records").get("evaluations")
    return [entry for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []


def add_evaluation(run_dir: str | Path, metrics: dict[str, Any], split: str | None, data: dict[str, Any],
                   crf: bool = False) -> list[dict[str, Any]]:
    """Record ``metrics`` (``evaluate``'s dict) of ``split`` of the dataset described by ``data``
    (a data config as a dict) in ``run_dir/evaluations.json`` (atomically); returns every entry."""
    entry = {"split": split, "dataset": data.get("dataset"), "root": data.get("root"), "crf": bool(crf),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "metrics": metrics}
    key = ("split", "dataset", "root", "crf")
    entries = [e for e in read_evaluations(run_dir) if any(e.get(k) != entry[k] for k in key)]
    entries.append(entry)
    atomic_write_json(Path(run_dir) / EVALUATIONS_FILE, {"evaluations": entries})
    return entries
