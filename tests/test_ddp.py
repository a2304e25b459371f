"""Distributed data-parallel through torchrun (gloo on CPU): ranks end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def _torchrun(worker: str, out: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command + ["--standalone", "--nproc_per_node", "2", str(Path(__file__).with_name(worker)),
                                       str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _assert_ranks_agree(out: Path) -> None:
    rank0 = load_file(str(out / "rank0.safetensors"))
    rank1 = load_file(str(out / "rank1.safetensors"))
    assert set(rank0) == set(rank1)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_two_process_torchrun_ranks_agree(tmp_path):
    result = _torchrun("ddp_worker.py", tmp_path)
    _assert_ranks_agree(tmp_path)
    assert (tmp_path / "run" / "checkpoints" / "latest.json").exists()
    assert "6 steps" in result.stdout


def test_semi_supervised_consistency_under_torchrun_ranks_agree(tmp_path):
    """UniMatch with an EMA teacher: every student pass goes through DDP's one forward, so the
    ranks (started from different weights) hold identical student and teacher weights."""
    result = _torchrun("ddp_semi_worker.py", tmp_path)
    _assert_ranks_agree(tmp_path)
    assert "4 steps" in result.stdout


def test_weak_classifier_under_torchrun_ranks_agree(tmp_path):
    result = _torchrun("ddp_weak_worker.py", tmp_path)
    _assert_ranks_agree(tmp_path)
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert "4 steps" in result.stdout and info["kind"] == "classifier"


def test_unsupervised_head_under_torchrun_ranks_agree(tmp_path):
    result = _torchrun("ddp_unsupervised_worker.py", tmp_path)
    _assert_ranks_agree(tmp_path)
    assert "4 steps" in result.stdout and (tmp_path / "run" / "model.json").is_file()
