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


# ----------------------------------------------------------------------------- tiny runs of every regime
# (built once per session, for the report tests; seconds each on one thread)


@pytest.fixture(scope="session")
def tiny_runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_runs")


@pytest.fixture(scope="session")
def tiny_supervised_run(tiny_runs_root: Path) -> Path:
    """A 12-step width-8 U-Net on 12 synthetic 32x48 images (4 classes), fp32."""
    from labelwise.config import DataConfig, ModelConfig, StageConfig, TrainConfig
    from labelwise.methods import supervised

    run_dir = tiny_runs_root / "supervised"
    config = TrainConfig(data=DataConfig(dataset="synthetic", batch_size=4, synthetic_train_images=12,
                                         synthetic_val_images=6, synthetic_size=(32, 48), synthetic_classes=4),
                         model=ModelConfig("unet", {"width": 8, "depth": 2}),
                         stages=[StageConfig(steps=12, lr=3e-3, warmup_steps=2)], run_dir=str(run_dir),
                         device="cpu", precision="fp32", checkpoint_every=6, log_every=3, progress=False)
    supervised.train(config)
    return run_dir


def _tiny_vit(path: Path, depth: int = 1) -> Path:
    from labelwise.models import create_vit
    from labelwise.models.vit_loading import save_vit

    torch.manual_seed(0)
    return save_vit(create_vit("custom", 8, embed_dim=32, depth=depth, num_heads=2), path)


@pytest.fixture(scope="session")
def tiny_cluster_run(tiny_runs_root: Path) -> Path:
    """k-means (6 clusters) on a tiny random ViT over 8 synthetic 32x48 images."""
    from labelwise.config import load_config
    from labelwise.methods.unsupervised.config import UnsupervisedConfig
    from labelwise.methods.unsupervised.train import train

    root = tiny_runs_root / "unsupervised"
    vit = _tiny_vit(tiny_runs_root / "vit1.safetensors")
    config = load_config(UnsupervisedConfig, None, [
        "data.dataset=synthetic", "data.synthetic_train_images=8", "data.synthetic_val_images=5",
        "data.synthetic_size=[32, 48]", f"features.backbone={vit}", "features.crop_mode=whole",
        "features.crop_size=32", f"features.cache_dir={root / 'cache'}", f"run_dir={root / 'run'}",
        "method=kmeans", "eval.clusters=6", "device=cpu", "progress=false", "eval.linear_probe=false"])
    return train(config).run_dir


@pytest.fixture(scope="session")
def tiny_semi_run(tiny_runs_root: Path) -> Path:
    """FixMatch, 6 steps, 4 labeled + 12 unlabeled synthetic 32x48 images."""
    from labelwise.config import load_config
    from labelwise.data.build import build_datasets
    from labelwise.data.splits import dataset_names, split_labeled, write_split
    from labelwise.methods.semi import SemiConfig, train

    data = ["data.dataset=synthetic", "data.synthetic_train_images=16", "data.synthetic_val_images=4",
            "data.synthetic_size=[32, 48]"]
    names = dataset_names(build_datasets(load_config(SemiConfig, None, [*data, "semi.method=supervised_only"])
                                         .data).train)
    labeled, unlabeled = write_split(tiny_runs_root / "split", split_labeled(names, count=4, seed=0))
    run_dir = tiny_runs_root / "semi"
    train(load_config(SemiConfig, None, [
        *data, f"data.train_list={labeled}", f"semi.unlabeled_list={unlabeled}", "data.batch_size=2",
        "stages.0.steps=6", "model.options={width: 8}", f"run_dir={run_dir}", "device=cpu", "progress=false",
        "precision=fp32", "checkpoint_every=3", "log_every=2", "semi.method=fixmatch", "semi.threshold=0.3"]))
    return run_dir


@pytest.fixture(scope="session")
def tiny_weak_run(tiny_runs_root: Path) -> Path:
    """``weak run``: a 3-step multi-class-token ViT on the tags of 6 synthetic 32x48 images, then a
    4-step width-8 U-Net on its pseudo-masks."""
    from labelwise.config import load_config
    from labelwise.methods.weak.config import WeakConfig
    from labelwise.methods.weak.pipeline import run

    vit = _tiny_vit(tiny_runs_root / "vit2.safetensors", depth=2)
    run_dir = tiny_runs_root / "weak"
    run(load_config(WeakConfig, None, [
        "data.dataset=synthetic", "data.synthetic_train_images=6", "data.synthetic_val_images=3",
        "data.synthetic_size=[32, 48]", f"backbone={vit}", "image_size=[32, 48]", "stages.0.steps=3",
        "batch_size=4", f"run_dir={run_dir}", "device=cpu", "progress=false", "checkpoint_every=20",
        "log_every=1", "precision=fp32", "cams.blocks=2", "pseudo_masks.background_class=0",
        'segmenter_overrides=["stages.0.steps=4", "data.batch_size=2", "model.options={width: 8}", "log_every=2"]']))
    return run_dir
