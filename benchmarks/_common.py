"""Helpers shared by the benchmark scripts: locating data and writing results JSON."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from labelwise.models.vit import create_vit
from labelwise.models.vit_loading import load_vit, save_vit

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def require_data(name: str) -> Path:
    """``../shared/data/<name>``, or exit with a message saying where it was expected."""
    path = SHARED_DATA / name
    if not path.exists():
        sys.exit(f"benchmark needs the dataset {name!r} at {path} (../shared/data beside the project); not found")
    return path


def git_commit() -> str:
    """HEAD's sha, with ``+dirty`` when src/, configs/ or benchmarks/ differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "configs", "benchmarks/*.py"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Recorded when the benchmark starts, so later commits made while it runs do not relabel it.
START_COMMIT = git_commit()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


def command_line() -> str:
    """The command that reran this script, from the project root."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def write_results(name: str, rows: list[dict[str, Any]], device: torch.device, extra: dict[str, Any] | None = None,
                  suffix: str = "") -> Path:
    """Write ``benchmarks/results/<name><suffix>.json`` in the DESIGN.md format."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = command_line()
    payload = {
        "benchmark": name,
        "commit": START_COMMIT,
        "command": command,
        "device": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
        **(extra or {}),
        "rows": rows,
    }
    path = RESULTS / f"{name}{suffix}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


#: The default backbone's recipe: (config, run folder, results suffix) of each pretraining stage,
#: in order; the second stage continues the first one's export (its config's ``init``).
DEFAULT_BACKBONE_STAGES = (
    ("configs/pretrain_vit_tiny.yaml", "benchmarks/runs/pretrain_dino", ""),
    ("configs/pretrain_vit_tiny_continue.yaml", "benchmarks/runs/pretrain_dino_continue", "_continue"),
)


def ensure_default_backbone(rebuild: bool = True) -> Path | None:
    """The project's pretrained ViT (``src/labelwise/weights/labelwise_vit.safetensors``).

    When the file is missing and ``rebuild`` is true, it is rebuilt by running
    ``benchmarks/pretrain_dino.py`` once per stage of :data:`DEFAULT_BACKBONE_STAGES` (the
    commands in ``src/labelwise/weights/README.md``; about 80 + 50 minutes on 2 CPU cores, each resumable);
    only the last stage writes the file. Returns ``None`` when it is missing and ``rebuild`` is
    false.
    """
    from labelwise.models.vit_loading import DEFAULT_BACKBONE_PATH

    if DEFAULT_BACKBONE_PATH.is_file():
        return DEFAULT_BACKBONE_PATH
    if not rebuild:
        return None
    print(f"{DEFAULT_BACKBONE_PATH} is missing: rebuilding it with benchmarks/pretrain_dino.py in "
          f"{len(DEFAULT_BACKBONE_STAGES)} stages (about 130 min on 2 CPU cores; interrupt and re-run to resume)",
          flush=True)
    for index, (config, run_dir, suffix) in enumerate(DEFAULT_BACKBONE_STAGES):
        command = [sys.executable, str(ROOT / "benchmarks" / "pretrain_dino.py"), "--config", config,
                   "--run-dir", run_dir, "--suffix", suffix]
        if index < len(DEFAULT_BACKBONE_STAGES) - 1:
            command.append("--no-export")
        subprocess.run(command, cwd=ROOT, check=True)
    if not DEFAULT_BACKBONE_PATH.is_file():
        sys.exit(f"benchmarks/pretrain_dino.py finished without writing {DEFAULT_BACKBONE_PATH}")
    return DEFAULT_BACKBONE_PATH


def random_backbone(like: Path, folder: Path) -> Path:
    """The architecture of ``like`` at a seeded random initialisation, saved once."""
    path = folder / "random_vit.safetensors"
    if not path.exists():
        config = load_vit(like).config
        embed_dim, depth, num_heads = config.dims
        torch.manual_seed(0)
        folder.mkdir(parents=True, exist_ok=True)
        save_vit(create_vit("custom", config.patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads), path)
    return path
