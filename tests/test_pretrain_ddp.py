"""Pretraining under torchrun (2 processes, gloo on CPU): DINO + iBOT runs to the end.

The iBOT centre update and the MoCo queue use collective operations inside the forward pass;
this checks that no rank skips one (a deadlock) and that DDP sees a gradient for every
parameter at every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TINY = [
    "backbone.arch=custom", "backbone.patch_size=8", "backbone.options={embed_dim: 48, depth: 2, num_heads: 3}",
    "multicrop.global_size=32", "multicrop.local_size=16", "multicrop.local_crops=2",
    "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.patch_out_dim=64", "dino.ibot=true",
    "dino.mask_prob=0.3", "data.batch_size=2", "progress=false", "log_every=1",
]


@pytest.mark.slow
def test_two_process_pretraining(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(8):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(images / f"{index}.png")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    command += ["--standalone", "--nproc_per_node", "2", "-m", "labelwise", "pretrain", "--images", str(images),
                "--steps", "3", "--run-dir", str(tmp_path / "run"), "--device", "cpu"]
    command += [item for setting in TINY for item in ("--set", setting)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "model.json").read_text())["pretrain"]
    assert summary["steps"] == 3 and summary["images_seen"] == 3 * 2 * 2 and summary["batch_size"] == 4
    assert (tmp_path / "run" / "weights.safetensors").exists()
