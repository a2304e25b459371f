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
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from labelwise.errors import CheckpointError
from labelwise.io.atomic import atomic_write_json, is_write_failure, write_failure_reason
from labelwise.io.jsonfile import read_json
from labelwise.io.tensors import file_sha256, read_safetensors

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
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        model_tensors = {k: v.detach().contiguous().cpu() for k, v in checkpoint.model_state.items()}
        tensors_of = {"model.safetensors": model_tensors}
        optim_tensors, optim_plain = _flatten_optimizer(checkpoint.optimizer_state)
        rng_plain = []
        for rank, (rng_tensors, plain) in enumerate(checkpoint.rng):
            for key, value in rng_tensors.items():
                optim_tensors[f"rank{rank}.{key}"] = value
            rng_plain.append(plain)
        tensors_of["optimizer.safetensors"] = optim_tensors
        digests = {}
        for file_name, tensors in tensors_of.items():
            save_file(tensors, str(staging / file_name))
            digests[file_name] = file_sha256(staging / file_name)
        state = {"step": checkpoint.step, "optimizer": optim_plain, "rng": rng_plain, "extra": checkpoint.extra,
                 "sha256": digests}
        (staging / "state.json").write_text(json.dumps(state))
        _fsync_folder(staging)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        _fsync_folder(root)
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        previous = latest_checkpoint_dir(run_dir) if (root / "latest.json").is_file() else None
        then = ("the previous checkpoint {} is intact. Free disk space or make the folder writable, then continue "
                "with --resume".format(previous.name) if previous else "no earlier checkpoint exists. Free disk space "
                "or make the folder writable, then run the command again")
        raise CheckpointError(f"{final}: cannot write the checkpoint ({write_failure_reason(exc)}); {then}") from exc
    atomic_write_json(root / "latest.json", {"step": checkpoint.step, "dir": name})
    _prune(root, keep, protect=name)
    return final


def _fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s files and its entry list, so a power cut cannot leave a renamed but
    empty checkpoint (a killed process needs none of this: the kernel still writes its data)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some systems (Windows)
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


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
    """The newest checkpoint folder: the one ``latest.json`` names, or, when that pointer is
    missing or corrupt, the newest ``step_*`` folder (folders appear only once complete, by
    rename); None when the run has no checkpoint yet."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest.json"
    folders = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    if pointer.exists():
        try:
            info = read_json(pointer, "checkpoint pointer")
        except CheckpointError:
            info = None
        name = info.get("dir") if isinstance(info, dict) else None
        if isinstance(name, str) and name.startswith("step_") and Path(name).name == name and (root / name).is_dir():
            return root / name
        if not folders:
            raise CheckpointError(f"{pointer}: names no checkpoint folder ({str(info)[:80]}) and {root} holds none; "
                                  "start again with --overwrite")
        warnings.warn(f"{pointer}: corrupt or stale pointer; resuming from the newest checkpoint folder "
                      f"{folders[-1].name}", stacklevel=2)
    return folders[-1] if folders else None


def _load_safetensors(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    try:
        return read_safetensors(path, "checkpoint file", sha256)
    except CheckpointError as exc:
        others = sorted(p.name for p in path.parent.parent.glob("step_*") if p.is_dir() and p != path.parent)
        hint = (f"; delete {path.parent} to resume from {others[-1]}" if others
                else "; no earlier checkpoint is kept: start again with --overwrite")
        raise CheckpointError(f"{exc}{hint}") from exc


def load_training_checkpoint(folder: Path) -> TrainingCheckpoint:
    """Read a checkpoint folder written by :func:`save_training_checkpoint`."""
    folder = Path(folder)
    state_path = folder / "state.json"
    state = read_json(state_path, "checkpoint state", missing="checkpoint state file is missing")
    if not isinstance(state, dict) or not isinstance(state.get("rng"), list) or "optimizer" not in state:
        raise CheckpointError(f"{state_path}: corrupt checkpoint state (expected step, optimizer, rng)")
    digests = state.get("sha256") or {}  # absent in checkpoints written before checksums were recorded
    model_state = _load_safetensors(folder / "model.safetensors", digests.get("model.safetensors"))
    tensors = _load_safetensors(folder / "optimizer.safetensors", digests.get("optimizer.safetensors"))
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
