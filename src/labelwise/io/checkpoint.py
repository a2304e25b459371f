"""Training checkpoints: weights + optimiser + RNG + state JSON, resumable bit for bit.

Layout of a run folder::

    run_dir/checkpoints/step_000500/model.safetensors      model weights
                                   /optimizer.safetensors  optimiser tensors and RNG states
                                   /state.json             step, epoch, optimiser scalars, RNG
    run_dir/checkpoints/latest.json                        {"step": 500, "dir": "step_000500"}
    run_dir/weights.safetensors + run_dir/model.json       the exported final model (models/artifact.py)

A checkpoint folder is written under a temporary name and renamed when complete, and
``latest.json`` is replaced atomically afterwards, so a crash at any moment leaves the previous
checkpoint loadable. Nothing is unpickled: tensors go through safetensors, the rest is JSON.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from labelwise.errors import CheckpointError
from labelwise.io.atomic import atomic_write_json
from labelwise.io.jsonfile import read_json
from labelwise.io.tensors import read_safetensors

# ---------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Current torch (CPU and CUDA), numpy and Python RNG states as (tensors, JSON-able)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    plain = {
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, plain


def restore_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    name, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = plain["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


# ---------------------------------------------------------------------------------------------
# Optimiser state <-> (tensors, JSON)


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in plain["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": plain["param_groups"]}


# ---------------------------------------------------------------------------------------------
# Training checkpoints


@dataclass
class TrainingCheckpoint:
    """What a resumed run needs. ``rng`` holds one (tensors, plain) pair per DDP rank."""

    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = field(default_factory=list)


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_training_checkpoint(run_dir: Path, checkpoint: TrainingCheckpoint, keep: int = 2) -> Path:
    """Write ``checkpoint`` atomically and keep only the newest ``keep`` checkpoint folders."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{checkpoint.step:07d}"
    final = root / name
    staging = root / f".{name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()

    save_file({k: v.detach().contiguous().cpu() for k, v in checkpoint.model_state.items()}, str(staging / "model.safetensors"))
    optim_tensors, optim_plain = _flatten_optimizer(checkpoint.optimizer_state)
    rng_plain = []
    for rank, (rng_tensors, plain) in enumerate(checkpoint.rng):
        for key, value in rng_tensors.items():
            optim_tensors[f"rank{rank}.{key}"] = value
        rng_plain.append(plain)
    save_file(optim_tensors, str(staging / "optimizer.safetensors"))
    state = {"step": checkpoint.step, "optimizer": optim_plain, "rng": rng_plain, "extra": checkpoint.extra}
    (staging / "state.json").write_text(json.dumps(state))

    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    atomic_write_json(root / "latest.json", {"step": checkpoint.step, "dir": name})
    _prune(root, keep, protect=name)
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    folders = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in folders[:-keep] if keep > 0 else []:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds anything under ``checkpoints/`` (a run to resume)."""
    root = checkpoint_root(Path(run_dir))
    return root.is_dir() and any(root.iterdir())


def latest_checkpoint_dir(run_dir: Path) -> Path | None:
    """The folder named by ``latest.json``, or None when the run has no checkpoint yet."""
    pointer = checkpoint_root(run_dir) / "latest.json"
    if not pointer.exists():
        return None
    info = read_json(pointer, "checkpoint pointer")
    try:
        folder = checkpoint_root(run_dir) / info["dir"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer}: unreadable checkpoint pointer: {exc}") from exc
    if not folder.is_dir():
        raise CheckpointError(f"{pointer}: names {folder}, which does not exist")
    return folder


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, "checkpoint file")


def load_training_checkpoint(folder: Path) -> TrainingCheckpoint:
    """Read a checkpoint folder written by :func:`save_training_checkpoint`."""
    folder = Path(folder)
    state_path = folder / "state.json"
    state = read_json(state_path, "checkpoint state", missing="checkpoint state file is missing")
    model_state = _load_safetensors(folder / "model.safetensors")
    tensors = _load_safetensors(folder / "optimizer.safetensors")
    rng = []
    for rank, plain in enumerate(state["rng"]):
        prefix = f"rank{rank}."
        rng.append(({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, plain))
    optimizer_state = _unflatten_optimizer(tensors, state["optimizer"])
    return TrainingCheckpoint(state["step"], model_state, optimizer_state, state.get("extra", {}), rng)


# ---------------------------------------------------------------------------------------------
# Exported models (for evaluate / predict)


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that names missing / unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)
