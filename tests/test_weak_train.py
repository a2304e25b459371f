"""Stage 1 of weak supervision: tagged training images, classifier training, export, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelwise.config import load_config
from labelwise.data.synthetic import SyntheticShapes
from labelwise.data.tags import tags_from_masks
from labelwise.errors import CheckpointError, ConfigError, DataError
from labelwise.methods.weak.config import WeakConfig
from labelwise.methods.weak.data import TaggedImages
from labelwise.methods.weak.train import load_classifier, tagged_training_images, train_classifier
from labelwise.models import create_vit
from labelwise.models.vit_loading import save_vit


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_vit(create_vit("custom", 8, embed_dim=32, depth=2, num_heads=2),
                    tmp_path_factory.mktemp("vit") / "tiny.safetensors")


def _config(tmp_path: Path, backbone: Path, *extra: str) -> WeakConfig:
    return load_config(WeakConfig, None, [
        "data.dataset=synthetic", "data.synthetic_train_images=16", "data.synthetic_size=[32, 48]",
        f"backbone={backbone}", "image_size=[32, 48]", "stages.0.steps=40", "batch_size=8", "stages.0.lr=0.002",
        f"run_dir={tmp_path / 'run'}", "device=cpu", "progress=false", "log_every=5", "checkpoint_every=20",
        "precision=fp32", "cams.blocks=2", *extra])


def test_derived_tags_are_those_of_each_sample_mask(tiny_vit: Path, tmp_path: Path) -> None:
    dataset, class_map = tagged_training_images(_config(tmp_path, tiny_vit, "tag_min_fraction=0.05"))
    source = SyntheticShapes(num_images=16, size=(32, 48), num_classes=5, seed=0)
    for i in (0, 7):
        expected = tags_from_masks(source[i]["mask"][None], 5, 0.05)[0].float()
        assert torch.equal(dataset[i]["tags"], expected)
        assert dataset[i]["image"].shape == (3, 32, 48)


def test_training_learns_the_tags_and_the_export_reloads(tiny_vit: Path, tmp_path: Path) -> None:
    result = train_classifier(_config(tmp_path, tiny_vit))
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["mlsm"] for line in lines if "mlsm" in line]
    assert losses[-1] < losses[0]
    model, summary = load_classifier(result.run_dir)
    assert summary["class_names"] == ["background", "disc", "box", "stripes", "blob"]
    assert summary["num_classes"] == 5 and summary["variant"] == "v2" and summary["readout"] == "linear"
    # the exported weights are the trained ones: same scores as the trainer's model on a batch
    dataset, _ = tagged_training_images(_config(tmp_path, tiny_vit))
    images = torch.stack([dataset[i]["image"] for i in range(4)])
    with torch.no_grad():
        scores = model(images).scores
    assert scores.shape == (4, 5) and torch.isfinite(scores).all()
    info = json.loads((result.run_dir / "model.json").read_text())  # the one artifact layout of every regime
    assert info["kind"] == "classifier" and info["format"] == "labelwise-artifact/1"
    assert (result.run_dir / "weights.safetensors").is_file()
    with pytest.raises(CheckpointError, match="model.json: missing"):
        load_classifier(tmp_path)


def test_resume_continues_exactly(tiny_vit: Path, tmp_path: Path) -> None:
    full = train_classifier(_config(tmp_path / "a", tiny_vit, f"run_dir={tmp_path / 'a'}"))
    config = _config(tmp_path / "b", tiny_vit, f"run_dir={tmp_path / 'b'}")
    train_classifier(config, stop_at=20)
    resumed = train_classifier(config, resume=True)
    a, _ = load_classifier(full.run_dir)
    b, _ = load_classifier(resumed.run_dir)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_user_images_with_a_tag_file(tiny_vit: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((16, 24, 3), 128, np.uint8)).save(folder / f"{name}.png")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["sky", "road"]}))
    (tmp_path / "tags.csv").write_text("image,tags\na,sky\nb,sky;road\n")
    config = _config(tmp_path, tiny_vit, f"images=[{folder}]", f"tags={tmp_path / 'tags.csv'}",
                     f"data.class_map={tmp_path / 'classes.json'}", "image_size=[16, 24]")
    dataset, class_map = tagged_training_images(config)
    assert list(class_map.names) == ["sky", "road"]
    assert dataset[1]["tags"].tolist() == [1.0, 1.0] and dataset[0]["tags"].tolist() == [1.0, 0.0]
    (tmp_path / "tags.csv").write_text("image,tags\na,sky\n")
    with pytest.raises(DataError, match=r"tags\.csv: 1 image\(s\) have no entry: \['b'\]"):
        tagged_training_images(config)
    with pytest.raises(ConfigError, match="tags"):
        _config(tmp_path, tiny_vit, f"images=[{folder}]").validate()


def test_pseudo_masks_stage_writes_a_folder_dataset_and_scores(tiny_vit: Path, tmp_path: Path) -> None:
    from labelwise.data.classmap import ClassMap
    from labelwise.data.folder import FolderDataset
    from labelwise.methods.weak.cams import CAMConfig
    from labelwise.methods.weak.data import TaggedImages
    from labelwise.methods.weak.pseudo_masks import PseudoMaskConfig
    from labelwise.methods.weak.stages import make_pseudo_masks

    result = train_classifier(_config(tmp_path, tiny_vit, "stages.0.steps=10"))
    source = SyntheticShapes(num_images=5, size=(32, 48), num_classes=5, seed=0)
    items = TaggedImages(source, 5, None, min_fraction=0.05)
    report = make_pseudo_masks(result.run_dir, items, tmp_path / "out", CAMConfig(blocks=2),
                               PseudoMaskConfig(ignore_fraction=0.25), batch_size=2)
    assert report["images"] == 5
    assert 0.7 <= report["pseudo_masks"]["kept_fraction"] <= 0.8  # a quarter of each image ignored
    assert 0 <= report["cams"]["miou"] <= 1
    pseudo = FolderDataset(tmp_path / "out" / "pseudo" / "train",
                           ClassMap.from_json(tmp_path / "out" / "pseudo" / "classes.json"))
    assert len(pseudo) == 5
    sample = pseudo[0]
    tagged = set(torch.nonzero(items[0]["tags"]).flatten().tolist())
    assert set(sample["mask"].unique().tolist()) <= tagged | {255}  # only tagged classes or ignore
    written = sorted(p.name for p in (tmp_path / "out" / "cams" / source[0]["name"]).iterdir())
    assert written == sorted(f"{source.class_map.names[c]}.png" for c in tagged)


def test_cli_train_then_cams_and_pseudo_masks(tiny_vit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    from labelwise.cli import main

    common = ["--set", "data.dataset=synthetic", "--set", "data.synthetic_train_images=4",
              "--set", "data.synthetic_size=[32, 48]", "--set", "image_size=[32, 48]", "--set", "batch_size=4",
              "--set", "progress=false", "--set", "precision=fp32", "--set", "cams.blocks=2", "--device", "cpu"]
    run = tmp_path / "run"
    assert main(["weak", "train", *common, "--backbone", str(tiny_vit), "--steps", "3", "--run-dir", str(run)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
    assert main(["weak", "cams", str(run), "--out", str(tmp_path / "cams")]) == 0
    assert (tmp_path / "cams" / "cams").is_dir() and not (tmp_path / "cams" / "pseudo").exists()
    assert main(["weak", "pseudo-masks", str(run), "--batch-size", "2"]) == 0
    report = json.loads((run / "pseudo_masks" / "pseudo_masks.json").read_text())
    assert report["images"] == 4 and "miou" in report["pseudo_masks"]
    assert len(list((run / "pseudo_masks" / "pseudo" / "train" / "labels").glob("*.png"))) == 4


def test_run_chains_every_stage_and_scores_the_val_split(tiny_vit: Path, tmp_path: Path) -> None:
    from labelwise.methods.weak.pipeline import run, segmenter_config

    config = _config(tmp_path, tiny_vit, "stages.0.steps=3", "batch_size=4", "hybrid=true",
                     "data.synthetic_train_images=6",
                     "data.synthetic_val_images=3",
                     'segmenter_overrides=["stages.0.steps=2", "data.batch_size=2", "model.options={width: 8}"]')
    report = run(config, resume=True)  # nothing to resume yet: every stage starts fresh
    assert set(report) == {"pseudo_masks", "segmenter", "final", "model", "model_subfolder"}
    assert report["model"] == str(tmp_path / "run" / "segmenter")  # no self-training: the first segmenter
    assert report["segmenter"]["steps"] == 2 and report["final"]["split"] == "val"
    assert (tmp_path / "run" / "segmenter" / "weights.safetensors").is_file()
    assert 0 <= report["final"]["miou"] <= 1
    assert json.loads((tmp_path / "run" / "weak_run.json").read_text())["segmenter"]["steps"] == 2
    hybrid, summary = load_classifier(tmp_path / "run")  # the hybrid stem survives export and reload
    assert summary["hybrid"] is True and type(hybrid.backbone.patch_embed).__name__ == "ConvStem"
    seg = segmenter_config(config, tmp_path / "pseudo", tmp_path / "seg")
    assert seg.loss.class_weights == "balanced" and seg.data.dataset == "folder" and seg.data.val_split == "train"
    config.segmenter_overrides = ["loss.class_weights=none"]
    assert segmenter_config(config, tmp_path / "pseudo", tmp_path / "seg").loss.class_weights == "none"


def test_aerial_tiles_train_on_crops_and_pseudo_label_every_pixel_once(tiny_vit: Path, tmp_path: Path) -> None:
    from labelwise.data.windows import TileWindows

    root = tmp_path / "aerial"
    colors = [(60, 16, 152), (132, 41, 246), (110, 193, 228)]
    (root / "tile1" / "images").mkdir(parents=True)
    (root / "tile1" / "masks").mkdir()
    (root / "classes.json").write_text(json.dumps({"classes": ["building", "land", "road"],
                                                   "colors": ["#3C1098", "#8429F6", "#6EC1E4"]}))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (40, 52))
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(root / "tile1" / "images" / "a.png")
    Image.fromarray(np.asarray(colors, np.uint8)[labels]).save(root / "tile1" / "masks" / "a.png")
    config = _config(tmp_path, tiny_vit, "data.dataset=aerial", f"data.root={root}", "data.train_tiles=[1]",
                     "data.val_tiles=[1]", "data.tile_crop=16", "data.samples_per_epoch=5", "image_size=[16, 16]")
    crops, _ = tagged_training_images(config)
    assert len(crops) == 5 and crops[0]["image"].shape == (3, 16, 16)
    whole, _ = tagged_training_images(config, whole=True)
    assert isinstance(whole.source, TileWindows)
    items = TaggedImages(whole.source, 3, None, min_fraction=0.01)
    owned = sum(int((items[i]["mask"] != 255).sum()) for i in range(len(items)))
    assert owned == 40 * 52  # every pixel of the tile in exactly one window
    for i in range(len(items)):
        assert torch.equal(items[i]["tags"], tags_from_masks(items[i]["mask"][None], 3, 0.01)[0].float())


def _chance_references(source: torch.utils.data.Dataset) -> tuple[float, float]:
    """mIoU of labeling every pixel as the background (class 0, the majority) and of labeling every
    pixel with a class drawn uniformly among the image's tagged classes (the background included),
    computed from the masks alone."""
    from labelwise.eval.metrics import ConfusionMatrix

    generator = np.random.default_rng(0)
    constant, uniform = ConfusionMatrix(5, 255), ConfusionMatrix(5, 255)
    for i in range(len(source)):  # type: ignore[arg-type]
        mask = np.asarray(source[i]["mask"])
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=5) >= 0.01 * mask.size)
        constant.update(torch.zeros(1, *mask.shape, dtype=torch.long), torch.from_numpy(mask)[None].long())
        drawn = generator.choice(np.union1d(present, [0]), size=mask.shape)
        uniform.update(torch.from_numpy(drawn)[None].long(), torch.from_numpy(mask)[None].long())
    return float(constant.compute().miou), float(uniform.compute().miou)


def _synthetic_end_to_end(tmp_path: Path, *overrides: str) -> tuple[dict, tuple[float, float], tuple[float, float]]:
    """``run`` on 64 + 16 synthetic 48x64 images with a small random-init ViT as ``backbone`` and a
    width-8 U-Net segmenter; returns the report and the train / val chance references."""
    from labelwise.data.build import build_datasets, build_eval_dataset
    from labelwise.methods.weak.pipeline import run

    torch.manual_seed(0)
    vit = save_vit(create_vit("custom", 8, embed_dim=32, depth=2, num_heads=2), tmp_path / "vit.safetensors")
    config = load_config(WeakConfig, None, [
        "data.dataset=synthetic", "data.synthetic_train_images=64", "data.synthetic_val_images=16",
        "data.synthetic_size=[48, 64]", f"backbone={vit}", "batch_size=16", f"run_dir={tmp_path / 'run'}",
        "device=cpu", "progress=false", "checkpoint_every=1000", "precision=fp32", "cams.blocks=2",
        "pseudo_masks.background_class=0",
        'segmenter_overrides=["stages.0.steps=150", "data.batch_size=8", "model.options={width: 8}", '
        '"stages.0.lr=0.005"]', *overrides])
    report = run(config)
    return report, _chance_references(build_datasets(config.data).train), \
        _chance_references(build_eval_dataset(config.data)[0])


def test_end_to_end_on_synthetic_data_is_clearly_above_chance(tmp_path: Path) -> None:
    """Tags only -> classifier -> CAMs -> pseudo-masks -> U-Net, on a small random-init ViT, against
    the chance references of :func:`_chance_references`."""
    report, (constant_train, uniform_train), (constant_val, uniform_val) = _synthetic_end_to_end(
        tmp_path, "image_size=[48, 64]", "stages.0.steps=150", "stages.0.lr=0.001", "new_lr_scale=1")
    assert report["pseudo_masks"]["cams"]["miou"] > max(2 * constant_train, 1.5 * uniform_train)
    assert report["pseudo_masks"]["pseudo_masks"]["miou"] > max(2 * constant_train, 1.5 * uniform_train)
    assert report["final"]["miou"] > max(2 * constant_val, 1.5 * uniform_val)


def test_cnn_cam_end_to_end_on_synthetic_data_is_clearly_above_chance(tmp_path: Path) -> None:
    """The same chain with ``method: cnn_cam`` on the ImageNet MobileNetV2 (``../shared/weights``, as in
    CI) at output stride 8, images seen 2x upscaled (a 12x16 CAM grid), 60 steps at the default lrs,
    and pixel-adaptive refinement: every stage clearly above the uniform draw among the tagged
    classes; the refined pseudo-masks also above twice the all-background labeling. (Measured when
    written: CAMs 0.189, pseudo-masks 0.262, final 0.246 against uniform 0.127 / 0.126 and
    all-background 0.116 / 0.122.)"""
    report, (constant_train, uniform_train), (_, uniform_val) = _synthetic_end_to_end(
        tmp_path, "method=cnn_cam", "encoder_weights=imagenet", "encoder_output_stride=8", "image_size=[96, 128]",
        "cams.scales=[2.0]", "stages.0.steps=60", "pseudo_masks.refine=par")
    assert report["pseudo_masks"]["cams"]["miou"] > max(constant_train, 1.3 * uniform_train)
    assert report["pseudo_masks"]["pseudo_masks"]["miou"] > max(2 * constant_train, 1.5 * uniform_train)
    assert report["final"]["miou"] > 1.5 * uniform_val
