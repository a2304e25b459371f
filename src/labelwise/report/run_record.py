"""What a run folder says about itself, read for the report: its model description, config,
validation metrics and training logs, whatever the regime.

Every regime's run folder holds ``model.json`` (the artifact description: kind, architecture,
classes, source weights, training provenance), ``config.yaml`` and ``metrics.jsonl`` (one JSON
object per logged step); segmenters add ``eval.json`` (validation metrics). A weak run nests its
segmenters (``segmenter/``, ``self_training/round{r}/segmenter/``), each with its own log and
``eval.json``, and reports its stages in ``weak_run.json``; a refined unsupervised run nests
``refine/round{r}/segmenter``. :func:`read_run` collects all of it; a file that is there but
unreadable is an error naming the file and the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelwise.errors import ConfigError
from labelwise.io.jsonfile import read_json
from labelwise.models.artifact import INFO_FILE
from labelwise.report.evaluations import read_evaluations

__all__ = ["RunRecord", "TrainingLog", "read_log", "read_run", "regime_of"]

#: Sub-folders of a run folder whose training logs belong in its report, besides its own.
NESTED_LOGS = ("segmenter", "self_training/round*/segmenter", "refine/round*/segmenter", "round*")


@dataclass
class TrainingLog:
    """One ``metrics.jsonl``: ``name`` (its folder relative to the run folder, ``""`` for the run's
    own) and its ``rows`` in file order."""

    name: str
    rows: list[dict[str, Any]]


@dataclass
class RunRecord:
    """A run folder as the report shows it.

    Attributes:
        folder: the run folder.
        regime: ``supervised``, ``semi``, ``weak``, ``unsupervised``, ``pretrain`` or ``unknown``.
        info: ``model.json`` (empty when missing).
        config_text: ``config.yaml`` as written (None when missing).
        metrics: validation metrics the run wrote (``eval.json``, or for a weak run the
            ``final`` scores of the segmenter it delivers); None when it wrote none.
        metrics_source: the file ``metrics`` came from.
        logs: the training logs (the run's own first).
        stages: the stage report of a weak (``weak_run.json``) or refined unsupervised run.
        evaluations: scores added by ``labelwise evaluate --report`` (``evaluations.json``).
    """

    folder: Path
    regime: str
    info: dict[str, Any]
    config_text: str | None
    metrics: dict[str, Any] | None
    metrics_source: str | None
    logs: list[TrainingLog] = field(default_factory=list)
    stages: dict[str, Any] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name or str(self.folder)

    @property
    def provenance(self) -> dict[str, Any]:
        """``command``, ``commit``, ``date``, ``labelwise_version``, ``data`` (``model.json``'s
        ``training``), ``source`` (encoder / backbone and the weights it started from) and
        ``architecture``."""
        training = dict(self.info.get("training") or {})
        return {**training, "source": self.info.get("source"), "architecture": self.info.get("architecture")}


def regime_of(info: dict[str, Any]) -> str:
    """The regime that wrote a ``model.json``: by its kind, and for segmenters by the keys the
    semi-supervised export adds."""
    kind = info.get("kind")
    if kind == "classifier":
        return "weak"
    if kind == "clusters":
        return "unsupervised"
    if kind == "backbone":
        return "pretrain"
    if kind == "segmenter":
        return "semi" if "semi_method" in info else "supervised"
    return "unknown"


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a line that is not a JSON object is a ``ConfigError``
    naming the file and the line (a torn last line, from a crash mid-write, is skipped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the line being written when the run stopped
                continue
            raise ConfigError(f"{path}:{number}: not a JSON line ({exc.msg}); the training log is damaged") from exc
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def _weak_metrics(folder: Path, stages: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    rounds = stages.get("self_training") or []
    if rounds and rounds[-1].get("final"):
        return rounds[-1]["final"], f"weak_run.json (self-training round {rounds[-1].get('round')})"
    if stages.get("final"):
        return stages["final"], "weak_run.json"
    segmenter_eval = folder / "segmenter" / "eval.json"
    if segmenter_eval.is_file():
        return read_json(segmenter_eval, "validation metrics"), "segmenter/eval.json"
    return None, None


def read_run(folder: str | Path) -> RunRecord:
    """Read a run folder of any regime (module docstring). ``ConfigError`` when the folder does
    not exist or holds neither ``model.json`` nor ``metrics.jsonl``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such run folder")
    info = read_json(folder / INFO_FILE, "model description") if (folder / INFO_FILE).is_file() else {}
    if not info and not (folder / "metrics.jsonl").is_file():
        raise ConfigError(f"{folder}: not a run folder (no {INFO_FILE} and no metrics.jsonl); pass the folder a "
                          f"training command wrote (its --run-dir)")
    config_path = folder / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    regime = regime_of(info)
    stages = None
    metrics, source = None, None
    if (folder / "weak_run.json").is_file():
        stages = read_json(folder / "weak_run.json", "weak run report")
        metrics, source = _weak_metrics(folder, stages)
    elif (folder / "refine" / "refine.json").is_file():
        stages = read_json(folder / "refine" / "refine.json", "refinement report")
    if metrics is None and (folder / "eval.json").is_file():
        metrics, source = read_json(folder / "eval.json", "validation metrics"), "eval.json"
    logs = []
    if (folder / "metrics.jsonl").is_file():
        logs.append(TrainingLog("", read_log(folder / "metrics.jsonl")))
    seen = {folder.resolve()}
    for pattern in NESTED_LOGS:
        for path in sorted(folder.glob(f"{pattern}/metrics.jsonl")):
            if path.parent.resolve() in seen:
                continue
            seen.add(path.parent.resolve())
            logs.append(TrainingLog(path.parent.relative_to(folder).as_posix(), read_log(path)))
    return RunRecord(folder, regime, info, config_text, metrics, source, logs, stages, read_evaluations(folder))

