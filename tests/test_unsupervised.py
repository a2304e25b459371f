"""Unsupervised segmentation: training views, cache = on-the-fly signal, exact resume, cluster
probe determinism, label-free export, and the CLI end to end on the synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from labelwise.cli import main
from labelwise.config import load_config
from labelwise.data.build import build_eval_dataset
from labelwise.data.synthetic import SyntheticShapes
from labelwise.errors import ConfigError
from labelwise.features.attention import local_positive_weights
from labelwise.features.cache import extract_features
from labelwise.losses.hidden_positives import HiddenPositiveLoss, HiddenPositiveLossConfig, mix_neighbourhood
from labelwise.methods import unsupervised
from labelwise.methods.unsupervised.data import (
    FiveCropDataset,
    PhotometricCopy,
    ResizedDataset,
    TileWindows,
    five_crop_boxes,
    window_starts,
)
from labelwise.methods.unsupervised.model import load_head
from labelwise.models import create_vit
from labelwise.models.vit_loading import save_vit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (conftest)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vit = create_vit("custom", 8, embed_dim=48, depth=2, num_heads=3)
    return save_vit(vit, tmp_path_factory.mktemp("vit") / "tiny.safetensors")


def _tiny_config(tmp_path: Path, backbone: Path | str, *extra: str) -> unsupervised.UnsupervisedConfig:
    return load_config(unsupervised.UnsupervisedConfig, None, [
        "data.dataset=synthetic", "data.synthetic_train_images=12", "data.synthetic_val_images=6",
        "data.synthetic_size=[48, 64]", f"features.backbone={backbone}", "features.crop_size=32",
        f"features.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", "stages.0.steps=6", "batch_size=8",
        "hp.pool_size=32", "hp.renew_every=2", "hp.lambda_warmup_steps=1", "hp.dim=16", "hp.rho=0.5",
        "stego.dim=16", "stego.knn=3", "stego.feature_samples=3", "stego.neg_samples=2", "clustering.dim=16",
        "clustering.fit_points=500", "device=cpu", "progress=false", "log_every=1", "checkpoint_every=3",
        "eval.linear_probe=false", *extra])


# ----------------------------------------------------------------------------- views


def test_five_crop_boxes_and_samples() -> None:
    assert five_crop_boxes(10, 20, 0.5) == [(0, 0, 5, 10), (0, 10, 5, 10), (5, 0, 5, 10), (5, 10, 5, 10),
                                            (2, 5, 5, 10)]
    source = SyntheticShapes(num_images=2, size=(40, 60), num_classes=4, seed=1)
    crops = FiveCropDataset(source, size=(16, 24), crop_ratio=0.5)
    assert len(crops) == 10 and crops.names[8] == f"{source[1]['name']}@bottom_right"
    sample = crops[8]
    image, mask = source[1]["image"], source[1]["mask"]
    expected = F.interpolate(image[None, :, 20:40, 30:60], size=(16, 24), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    torch.testing.assert_close(sample["image"], expected.clamp(0, 1))
    rows = ((torch.arange(16) + 0.5) * (20 / 16)).long() + 20
    cols = ((torch.arange(24) + 0.5) * (30 / 24)).long() + 30
    assert torch.equal(sample["mask"], mask[rows[:, None], cols[None, :]])
    with pytest.raises(ConfigError, match="crop_ratio"):
        FiveCropDataset(source, crop_ratio=0.0)


def test_photometric_copy_is_deterministic_and_keeps_geometry() -> None:
    source = SyntheticShapes(num_images=3, size=(24, 32), num_classes=4, seed=2)
    copy = PhotometricCopy(source, seed=5)
    first, again = copy[1], copy[1]
    assert torch.equal(first["image"], again["image"])
    assert not torch.allclose(first["image"], source[1]["image"])
    assert torch.equal(first["mask"], source[1]["mask"])
    assert not torch.allclose(copy[0]["image"] - source[0]["image"], first["image"] - source[1]["image"])


# ----------------------------------------------------------------------------- cache = on the fly


def _hp_signal(features: torch.Tensor, weights: torch.Tensor) -> tuple[float, torch.Tensor]:
    """HP loss (all terms) of a fixed random head on these inputs, and the head's weight gradient."""
    torch.manual_seed(0)
    head = torch.nn.Conv2d(features.shape[1], 8, 1)
    pool_ag = F.normalize(torch.randn(16, features.shape[1]), dim=1)
    pool_sp = F.normalize(torch.randn(16, 8), dim=1)
    loss = HiddenPositiveLoss(HiddenPositiveLossConfig(rho=1.0, precision="fp32"))
    code = head(features)
    value = loss(F.normalize(code, dim=1), features, code.detach(), pool_ag, pool_sp, 0.5,
                 z_mix=F.normalize(mix_neighbourhood(code, weights), dim=1))
    value.backward()
    return float(value.detach()), head.weight.grad.clone()


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_cached_features_and_local_weights_equal_the_on_the_fly_signal(tiny_vit: Path, tmp_path: Path,
                                                                      storage: str) -> None:
    """float32 storage reproduces the on-the-fly training signal bit for bit; float16 storage
    holds exactly the float16 rounding of the on-the-fly arrays (and the loss stays within 1e-3)."""
    from labelwise.methods.unsupervised.train import CachedViews
    from labelwise.models.vit_loading import load_vit

    vit = load_vit(tiny_vit).eval()
    views = ResizedDataset(SyntheticShapes(num_images=4, size=(40, 40), num_classes=4, seed=3), 32)
    cache = extract_features(vit, views, precision="fp32", device="cpu", attention_blocks=[-1],
                             attention_kinds=["local_positive"], labels=False, cache_dir=tmp_path, num_workers=0,
                             storage=storage)
    images = torch.stack([views[i]["image"] for i in range(4)])
    with torch.no_grad():
        out = vit(images, return_attention=[-1])
        weights = local_positive_weights(out.attentions[1][:, :, 1:, 1:].mean(1), (4, 4))
    features = out.patch_tokens
    dtype = np.dtype(storage)
    assert np.array_equal(np.asarray(cache.features), features.numpy().astype(dtype))
    assert np.array_equal(np.asarray(cache.attention["local_positive@1"]), weights.numpy().astype(dtype))

    batch = torch.utils.data.default_collate([CachedViews(cache, None, "local_positive@1")[i] for i in range(4)])
    cached_value, cached_grad = _hp_signal(batch["features"], batch["local_weights"])
    fly_value, fly_grad = _hp_signal(features, weights)
    if storage == "float32":
        # same inputs bit for bit; only the summation order of the head's conv may differ by layout
        assert cached_value == pytest.approx(fly_value, rel=1e-6)
        torch.testing.assert_close(cached_grad, fly_grad, rtol=1e-5, atol=1e-6)
    else:
        rounded_value, rounded_grad = _hp_signal(features.half().float(), weights.half().float())
        assert cached_value == pytest.approx(rounded_value, rel=1e-6)
        torch.testing.assert_close(cached_grad, rounded_grad, rtol=1e-5, atol=1e-6)
        assert cached_value == pytest.approx(fly_value, rel=1e-3)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["hp", "stego", "picie"])
def test_resume_continues_exactly(tiny_vit: Path, tmp_path: Path, method: str) -> None:
    full = unsupervised.train(_tiny_config(tmp_path / "a", tiny_vit, f"method={method}",
                                           f"features.cache_dir={tmp_path / 'cache'}"))
    config = _tiny_config(tmp_path / "b", tiny_vit, f"method={method}", f"features.cache_dir={tmp_path / 'cache'}")
    unsupervised.train(config, stop_at=3)
    resumed = unsupervised.train(config, resume=True)
    a, b = load_head(full.run_dir), load_head(resumed.run_dir)
    head_a, head_b = a.segmenter.head.state_dict(), b.segmenter.head.state_dict()
    assert set(head_a) == {"linear.weight", "linear.bias", "nonlinear.0.weight", "nonlinear.0.bias",
                           "nonlinear.2.weight", "nonlinear.2.bias"}  # the code head only, no training parts
    for key, value in head_a.items():
        assert torch.equal(value, head_b[key]), key
    assert torch.equal(a.centroids, b.centroids)
    assert a.summary["selection"] == "final_checkpoint"


def test_stego_shifts_are_calibrated_or_taken_as_given(tiny_vit: Path, tmp_path: Path) -> None:
    cache = f"features.cache_dir={tmp_path / 'cache'}"
    calibrated = unsupervised.train(_tiny_config(tmp_path / "a", tiny_vit, "method=stego", cache)).summary
    fixed = unsupervised.train(_tiny_config(tmp_path / "b", tiny_vit, "method=stego", "stego.shifts=fixed",
                                            "stego.neg_inter_shift=0.3", cache)).summary
    assert fixed["stego_shifts"] == {"rule": "fixed", "pos_intra_shift": 0.08, "pos_inter_shift": 0.02,
                                     "neg_inter_shift": 0.3}
    shifts = calibrated["stego_shifts"]
    assert shifts["rule"] == "calibrated"
    assert all(-1.0 <= shifts[k] <= 1.0 for k in ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift"))
    assert shifts["pos_intra_shift"] != 0.08
    with pytest.raises(ConfigError, match="stego.calibration_quantiles"):
        _tiny_config(tmp_path / "c", tiny_vit, "stego.calibration_quantiles=[0.5, 2, null]")


def test_centroids_are_deterministic_for_a_seed(tiny_vit: Path, tmp_path: Path) -> None:
    one = unsupervised.train(_tiny_config(tmp_path / "a", tiny_vit, "method=kmeans",
                                          f"features.cache_dir={tmp_path / 'cache'}"))
    two = unsupervised.train(_tiny_config(tmp_path / "b", tiny_vit, "method=kmeans",
                                          f"features.cache_dir={tmp_path / 'cache'}"))
    assert torch.equal(load_head(one.run_dir).centroids, load_head(two.run_dir).centroids)
    assert load_head(one.run_dir).centroids.shape == (5, 48)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hp.rho"):
        _tiny_config(tmp_path, "x", "hp.rho=2")
    with pytest.raises(ConfigError, match="method"):
        _tiny_config(tmp_path, "x", "method=nope")
    config = _tiny_config(tmp_path, "x", f"images=[{tmp_path}]")
    with pytest.raises(ConfigError, match="eval.clusters"):
        unsupervised.train(config)


# ----------------------------------------------------------------------------- end to end


def _labeled_folder(root: Path, dataset: SyntheticShapes) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for index in range(len(dataset)):
        sample = dataset[index]
        image = (sample["image"].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{index:03d}.png")
        Image.fromarray(sample["mask"].numpy().astype(np.uint8)).save(root / "labels" / f"{index:03d}.png")
    names = list(dataset.class_map.names)
    (root / "classes.json").write_text(json.dumps({"classes": names}))
    return root


def test_cli_train_evaluate_predict_on_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default backbone, HP with every term: clearly above chance after a short run, CRF and
    linear probe reported, and predictions mapped to class names with a few labeled images."""
    run = tmp_path / "run"
    settings = ["data.dataset=synthetic", "data.synthetic_train_images=24", "data.synthetic_val_images=8",
                "features.crop_size=64", f"features.cache_dir={tmp_path / 'cache'}", "batch_size=16",
                "hp.pool_size=64", "hp.renew_every=5", "hp.lambda_warmup_steps=5", "hp.dim=64", "progress=false",
                "eval.crf_workers=0", "device=cpu"]
    argv = ["unsupervised", "train", "--method", "hp", "--steps", "20", "--run-dir", str(run)]
    for item in settings:
        argv += ["--set", item]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["variant"] == "hp_full_agreeing" and summary["selection"] == "final_checkpoint"

    assert main(["unsupervised", "probe", str(run), "--crf", "--metrics", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    # chance: clusters drawn uniformly at random, independent of the image: IoU_c = (p_c / K) /
    # (p_c + 1 / K - p_c / K) for class frequency p_c (about 0.11 here)
    config = load_config(unsupervised.UnsupervisedConfig, run / "config.yaml")
    val = build_eval_dataset(config.data)[0]
    counts = np.bincount(np.concatenate([val[i]["mask"].numpy().ravel() for i in range(len(val))]), minlength=5)
    p = counts / counts.sum()
    chance = float(np.mean((p / 5) / (p + 1 / 5 - p / 5)))
    assert report["miou"] > 2 * chance, (report["miou"], chance)
    assert report["crf"]["miou"] > 2 * chance and report["linear_miou"] > report["miou"]
    assert sorted(report["mapping"]) == list(range(5))

    labeled = _labeled_folder(tmp_path / "labeled", SyntheticShapes(num_images=4, size=(96, 128), num_classes=5,
                                                                       seed=77))
    assert main(["predict", str(run), str(labeled / "images"), "--out", str(tmp_path / "pred"),
                 "--match-with", str(labeled), "--device", "cpu"]) == 0
    mapping = json.loads((tmp_path / "pred" / "cluster_mapping.json").read_text())
    assert sorted(mapping["mapping"].values()) == sorted(SyntheticShapes(num_images=1, num_classes=5).class_map.names)
    clusters = np.asarray(Image.open(tmp_path / "pred" / "clusters" / "000.png"))
    ids = np.asarray(Image.open(tmp_path / "pred" / "ids" / "000.png"))
    assert clusters.shape == (96, 128) and clusters.max() < 5
    truth = np.asarray(Image.open(labeled / "labels" / "000.png"))
    assert (ids == truth).mean() > 0.25  # matched pixel accuracy of random clusters: 1 / K = 0.2


def test_window_starts_cover_every_pixel_once() -> None:
    assert window_starts(10, 4) == [(0, 0, 4), (4, 4, 8), (6, 8, 10)]
    assert window_starts(8, 4) == [(0, 0, 4), (4, 4, 8)]
    assert window_starts(3, 4) == [(0, 0, 3)]


def test_tile_windows_score_each_labeled_pixel_exactly_once() -> None:
    source = SyntheticShapes(num_images=2, size=(23, 30), num_classes=4, seed=4)
    windows = TileWindows(source, window=10)
    assert len(windows) == 2 * 3 * 3
    for index in range(2):
        image, mask = source[index]["image"], source[index]["mask"]
        counted = torch.zeros_like(mask)
        for w, (src, y, x, *_rest) in enumerate(windows.windows):
            if src != index:
                continue
            sample = windows[w]
            assert sample["image"].shape == (3, 10, 10)
            torch.testing.assert_close(sample["image"][:, :min(10, 23 - y), :min(10, 30 - x)],
                                       image[:, y:y + 10, x:x + 10])
            owned = sample["mask"] != 255
            counted[y:y + 10, x:x + 10] += owned[:min(10, 23 - y), :min(10, 30 - x)].long()
            assert torch.equal(sample["mask"][owned], mask[y:y + 10, x:x + 10][owned[:min(10, 23 - y), :min(10, 30 - x)]])
        assert torch.equal(counted, torch.ones_like(mask))
    small = TileWindows(SyntheticShapes(num_images=1, size=(8, 9), num_classes=4, seed=4), window=10)
    sample = small[0]
    assert sample["image"].shape == (3, 10, 10) and (sample["mask"][8:] == 255).all() and (sample["mask"][:, 9:] == 255).all()
    assert (sample["mask"][:8, :9] != 255).all()


def test_random_patch_vectors_pick_the_stored_vectors(tmp_path: Path) -> None:
    from labelwise.features.store import write_feature_cache
    from labelwise.methods.unsupervised.train import random_patch_vectors

    features = torch.randn(5, 3, 2, 4)
    cache = write_feature_cache(tmp_path / "c", features.numpy(), [f"s{i}" for i in range(5)], stride=8)
    stored = torch.from_numpy(np.asarray(cache.features, np.float32)).flatten(2)  # [5, 3, 8]
    for count in (4, 23):  # without and with replacement; block smaller than the samples
        vectors = random_patch_vectors(cache, count, torch.Generator().manual_seed(1), block=2)
        assert vectors.shape == (count, 3)
        candidates = stored.permute(0, 2, 1).reshape(-1, 3)
        for vector in vectors:
            assert (candidates == vector).all(1).any()
    distinct = random_patch_vectors(cache, 5, torch.Generator().manual_seed(2))
    owners = [int(torch.nonzero((stored.permute(0, 2, 1) == v).all(2))[0, 0]) for v in distinct]
    assert sorted(owners) == [0, 1, 2, 3, 4]
