"""Shared fixtures: where the real datasets are, tiny training configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_shared(name: str) -> Path:
    """Path of ``../shared/data/<name>``; skips the test with a message when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"needs the real dataset at {path} (../shared/data beside the project); not present here")
    return path


@pytest.fixture
def tiny_config(tmp_path):
    """A TrainConfig that trains a very small U-Net on synthetic data in a few seconds."""
    from labelwise.config import AugmentConfig, DataConfig, ModelConfig, StageConfig, TrainConfig

    return TrainConfig(
        data=DataConfig(dataset="synthetic", batch_size=4, synthetic_train_images=16, synthetic_val_images=4,
                        synthetic_size=(32, 48), synthetic_classes=4),
        model=ModelConfig("unet", {"width": 8, "depth": 2}),
        stages=[StageConfig(steps=8, lr=2e-3, warmup_steps=2,
                            augment=AugmentConfig(hflip=0.5, rotate_degrees=15.0, scale=(0.8, 1.2),
                                                  brightness=0.1, contrast=0.1))],
        run_dir=str(tmp_path / "run"), device="cpu", precision="bf16", checkpoint_every=4, log_every=2,
        progress=False,
    )


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and far faster on a busy machine (use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
