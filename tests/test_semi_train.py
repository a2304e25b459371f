"""Semi-supervised training: pairing, the feature-perturbation stream, the EMA teacher, exact
resume, and the ``semi`` commands end to end on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from labelwise.config import AugmentConfig, StageConfig, load_config
from labelwise.data.build import build_datasets
from labelwise.data.splits import dataset_names, split_labeled, write_split
from labelwise.data.synthetic import SyntheticShapes
from labelwise.data.transforms import PairedAugment
from labelwise.engine.trainer import StepContext
from labelwise.errors import ConfigError, DataError
from labelwise.losses import build_loss
from labelwise.methods.semi import SemiConfig, train
from labelwise.methods.semi.data import ImagesOnly, LabeledUnlabeledPairs, pair_collate, unlabeled_images
from labelwise.methods.semi.model import SemiModel
from labelwise.methods.semi.perturb import confident_pseudo_labels
from labelwise.methods.semi.steps import make_consistency_step, unlabeled_loss
from labelwise.methods.semi.train import pseudo_label
from labelwise.models import create

DATA = ["data.dataset=synthetic", "data.synthetic_train_images=16", "data.synthetic_val_images=4",
        "data.synthetic_size=[32, 48]"]


def _split(tmp_path: Path, count: int = 4) -> tuple[Path, Path]:
    config = load_config(SemiConfig, None, [*DATA, "semi.method=supervised_only"])
    names = dataset_names(build_datasets(config.data).train)
    return write_split(tmp_path / "split", split_labeled(names, count=count, seed=0))


def _config(tmp_path: Path, *extra: str) -> SemiConfig:
    labeled, unlabeled = _split(tmp_path)
    return load_config(SemiConfig, None, [
        *DATA, f"data.train_list={labeled}", f"semi.unlabeled_list={unlabeled}", "data.batch_size=2",
        "stages.0.steps=6", "model.options={width: 8}", f"run_dir={tmp_path / 'run'}", "device=cpu",
        "progress=false", "precision=fp32", "checkpoint_every=3", "semi.threshold=0.3", *extra])


def test_pairs_cover_the_unlabeled_set_once_and_cycle_the_labeled_set() -> None:
    labeled = SyntheticShapes(num_images=3, size=(16, 16), seed=0)
    unlabeled = ImagesOnly(SyntheticShapes(num_images=7, size=(16, 16), seed=1))
    pairs = LabeledUnlabeledPairs(labeled, unlabeled, seed=5)
    assert len(pairs) == 7
    first = [pairs[i]["name"] for i in range(7)]
    assert [pairs[i]["name_u"] for i in range(7)] == dataset_names(unlabeled)
    assert sorted(first[:3]) == sorted(dataset_names(labeled))  # one permutation, then the next
    assert "mask" not in unlabeled[0]
    again = LabeledUnlabeledPairs(labeled, unlabeled, seed=5)
    assert [again[i]["name"] for i in range(7)] == first  # deterministic
    again.set_epoch(1)
    pairs.set_epoch(1)
    assert [again[i]["name"] for i in range(7)] == [pairs[i]["name"] for i in range(7)]
    batch = pair_collate([pairs[0], pairs[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image_u"].shape == (2, 3, 16, 16)
    assert batch["valid_u"].all() and batch["mask"].shape == (2, 16, 16)


def test_unlabeled_list_must_not_overlap_the_labeled_list(tmp_path: Path) -> None:
    config = _config(tmp_path)
    labeled_names = (tmp_path / "split" / "labeled.txt").read_text().split()
    images = unlabeled_images(config, [n for n in labeled_names if not n.startswith("#")])
    assert len(images) == 12 and "mask" not in images[0]
    overlapping = (tmp_path / "split" / "unlabeled.txt").read_text() + labeled_names[-1] + "\n"
    (tmp_path / "split" / "unlabeled.txt").write_text(overlapping)
    with pytest.raises(DataError, match="also in the labeled list"):
        unlabeled_images(config, [labeled_names[-1]])
    with pytest.raises(ConfigError, match="semi.unlabeled"):
        load_config(SemiConfig, None, [*DATA, "semi.method=fixmatch"])


def test_feature_perturbation_acts_only_in_its_stream() -> None:
    """With identity augmentation the supervised loss equals a plain forward's loss and the
    strong streams see unperturbed features; the fp loss equals the weak stream's own loss when
    the dropout probability is 0 and differs from it when it is not."""
    torch.manual_seed(0)
    student = create("unet", num_classes=3, width=8, depth=2, dropout=0.0).eval()  # eval: no BN batch stats
    images, images_u = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    masks = torch.randint(0, 3, (2, 32, 32))
    batch = {"image": images, "mask": masks, "image_u": images_u, "valid_u": torch.ones(2, 32, 32, dtype=torch.bool)}
    loss_fn = build_loss([{"name": "ce", "weight": 1.0}], num_classes=3, ignore_index=255)
    augment = [PairedAugment(AugmentConfig(hflip=0.0), ignore_index=255)]
    context = StepContext(0, 0, StageConfig(), torch.device("cpu"), "fp32")
    logs = {}
    for p in (0.0, 0.5):
        settings = load_config(SemiConfig, None, ["semi.unlabeled=[x]", f"semi.feature_dropout={p}",
                                                  "semi.threshold=0.0", "semi.cutmix_probability=0.0"]).semi
        step = make_consistency_step(settings, loss_fn, augment, 255, seed=0)
        logs[p] = step(SemiModel(student), batch, context).logs
    with torch.no_grad():
        expected_sup = F.cross_entropy(student(images), masks)
        weak = student(images_u)
        pseudo = confident_pseudo_labels(torch.softmax(weak, 1), 0.0)
        weak_self_loss = unlabeled_loss(weak, pseudo, torch.ones(2, 32, 32, dtype=torch.bool))
    for p in (0.0, 0.5):
        assert logs[p]["sup_ce"] == pytest.approx(float(expected_sup), rel=1e-5)
    assert logs[0.0]["fp"] == pytest.approx(float(weak_self_loss), rel=1e-5)
    assert logs[0.0]["confident"] == 1.0
    assert logs[0.0]["pseudo_top_share"] == pytest.approx(float(torch.bincount(pseudo.flatten()).max()) / pseudo.numel())
    assert logs[0.5]["fp"] != pytest.approx(float(weak_self_loss), rel=1e-3)
    assert logs[0.5]["s1"] == pytest.approx(logs[0.0]["s1"], rel=1e-5)  # the strong streams are untouched


def test_ema_teacher_follows_the_formula() -> None:
    torch.manual_seed(1)
    model = SemiModel(create("unet", num_classes=2, width=8, depth=2), ema_teacher=True)
    assert all(not p.requires_grad for p in model.teacher.parameters())
    before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    model.update_teacher(0.9)
    for old, new, student in zip(before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student)


def test_unimatch_with_ema_resumes_exactly(tmp_path: Path) -> None:
    extra = ["semi.method=unimatch", "semi.ema_teacher=true", "semi.rotation_weight=0.5",
             "semi.transform_consistency=0.5"]
    full = train(_config(tmp_path / "a", *extra))
    config = _config(tmp_path / "b", *extra)
    train(config, stop_at=3)
    resumed = train(config, resume=True)
    first, second = load_file(full.run_dir / "weights.safetensors"), load_file(resumed.run_dir / "weights.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert 0 <= resumed.metrics["miou"] <= 1 and resumed.metrics["labeled_images"] == 4


def test_semi_commands_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from labelwise.cli import main

    common = [f"--set={o}" for o in DATA]
    assert main(["semi", "split", *common, "--count", "4", "--seed", "0", "--out", str(tmp_path / "split")]) == 0
    assert json.loads(capsys.readouterr().out)["labeled_images"] == 4
    for method in ("supervised_only", "fixmatch", "self_training"):
        run = tmp_path / method
        code = main(["semi", "train", *common, "--labeled", str(tmp_path / "split" / "labeled.txt"),
                     "--unlabeled", str(tmp_path / "split" / "unlabeled.txt"), "--method", method,
                     "--set", "stages.0.steps=2", "--set", "data.batch_size=2", "--set", "model.options={width: 8}",
                     "--set", "progress=false", "--set", "semi.rounds=1", "--device", "cpu", "--run-dir", str(run)])
        assert code == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert 0 <= report["miou"] <= 1 and (run / "weights.safetensors").is_file()
    rounds = json.loads((tmp_path / "self_training" / "self_training.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["pseudo_labeled_images"] == 12


def test_self_training_from_a_given_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``--teacher`` replaces round 0: no round0 folder is trained, round 1 pseudo-labels with the
    given model, and the row's training seconds add the teacher's to round 1's."""
    from labelwise.cli import main

    common = [f"--set={o}" for o in DATA]
    assert main(["semi", "split", *common, "--count", "4", "--out", str(tmp_path / "split")]) == 0
    tiny = ["--set", "stages.0.steps=2", "--set", "data.batch_size=2", "--set", "model.options={width: 8}",
            "--set", "progress=false", "--device", "cpu", "--labeled", str(tmp_path / "split" / "labeled.txt")]
    assert main(["semi", "train", *common, *tiny, "--method", "supervised_only", "--run-dir", str(tmp_path / "sup")]) == 0
    run = tmp_path / "st"
    assert main(["semi", "train", *common, *tiny, "--method", "self_training", "--teacher", str(tmp_path / "sup"),
                 "--unlabeled", str(tmp_path / "split" / "unlabeled.txt"), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    rounds = json.loads((run / "self_training.json").read_text())["rounds"]
    teacher_eval = json.loads((tmp_path / "sup" / "eval.json").read_text())
    assert not (run / "round0").exists() and [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["teacher"] == str(tmp_path / "sup") and rounds[0]["miou"] == teacher_eval["miou"]
    final = json.loads((run / "eval.json").read_text())
    round1 = json.loads((run / "round1" / "eval.json").read_text())
    assert final["train_seconds"] == pytest.approx(teacher_eval["train_seconds"] + round1["train_seconds"])

    # running it again finds every round finished: nothing is pseudo-labeled or trained again
    import importlib

    semi_train = importlib.import_module("labelwise.methods.semi.train")  # the package exports a `train` function

    def fail(*args, **kwargs):
        raise AssertionError("a finished round was pseudo-labeled again")

    monkeypatch.setattr(semi_train, "pseudo_label", fail)
    monkeypatch.setattr(semi_train, "train_segmenter", fail)
    assert main(["semi", "train", *common, *tiny, "--method", "self_training", "--teacher", str(tmp_path / "sup"),
                 "--unlabeled", str(tmp_path / "split" / "unlabeled.txt"), "--run-dir", str(run), "--resume"]) == 0
    capsys.readouterr()
    assert json.loads((run / "self_training.json").read_text())["rounds"] == rounds
    assert json.loads((run / "eval.json").read_text())["train_seconds"] == pytest.approx(final["train_seconds"])
    monkeypatch.undo()

    info = json.loads((tmp_path / "sup" / "model.json").read_text())
    info["class_map"]["classes"] = [f"other{i}" for i in range(len(info["class_map"]["classes"]))]
    (tmp_path / "sup" / "model.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="semi.teacher: .* predicts classes"):
        train(load_config(SemiConfig, None, [*DATA, "semi.method=self_training", f"semi.teacher={tmp_path / 'sup'}",
                                              f"data.train_list={tmp_path / 'split' / 'labeled.txt'}",
                                              f"semi.unlabeled_list={tmp_path / 'split' / 'unlabeled.txt'}",
                                              f"run_dir={tmp_path / 'bad'}", "device=cpu"]))
    with pytest.raises(ConfigError, match="semi.teacher: only self_training"):
        load_config(SemiConfig, None, [*DATA, "semi.method=fixmatch", f"semi.teacher={tmp_path / 'sup'}",
                                       f"semi.unlabeled_list={tmp_path / 'split' / 'unlabeled.txt'}"])


def test_a_self_training_round_improves_over_its_teacher(tmp_path: Path) -> None:
    """Round 0 learns from 6 labeled synthetic images; round 1 adds the confident pseudo-labels
    of 42 unlabeled ones and must score higher on the validation images (both rounds are
    scored by the same evaluation, against the real validation masks)."""
    data = ["data.dataset=synthetic", "data.synthetic_train_images=48", "data.synthetic_val_images=16",
            "data.synthetic_size=[48, 64]"]
    names = dataset_names(build_datasets(load_config(SemiConfig, None, [*data, "semi.method=supervised_only"]).data).train)
    labeled, unlabeled = write_split(tmp_path / "split", split_labeled(names, count=6, seed=0))
    config = load_config(SemiConfig, None, [
        *data, f"data.train_list={labeled}", f"semi.unlabeled_list={unlabeled}", "semi.method=self_training",
        "semi.rounds=1", "data.batch_size=6", "stages.0.steps=120", "stages.0.lr=0.005",
        "model.options={width: 8}", f"run_dir={tmp_path / 'run'}", "device=cpu", "progress=false",
        "checkpoint_every=1000", "precision=fp32"])
    result = train(config)
    rounds = json.loads((tmp_path / "run" / "self_training.json").read_text())["rounds"]
    assert rounds[1]["confident_fraction"] > 0.3
    assert rounds[1]["miou"] > rounds[0]["miou"] + 0.02
    assert result.metrics["miou"] == rounds[1]["miou"]


def test_aerial_unlabeled_tiles_are_crops_without_masks(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    root = tmp_path / "aerial"
    colors = np.asarray([(60, 16, 152), (132, 41, 246)], np.uint8)
    (root / "classes.json").parent.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"classes": ["building", "land"], "colors": ["#3C1098", "#8429F6"]}))
    rng = np.random.default_rng(0)
    for tile in (1, 2):
        (root / f"tile{tile}" / "images").mkdir(parents=True)
        (root / f"tile{tile}" / "masks").mkdir()
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / f"tile{tile}" / "images" / "a.png")
        Image.fromarray(colors[rng.integers(0, 2, (30, 40))]).save(root / f"tile{tile}" / "masks" / "a.png")
    base = ["data.dataset=aerial", f"data.root={root}", "data.train_tiles=[1]", "data.val_tiles=[1]",
            "data.tile_crop=16", "data.samples_per_epoch=6", "semi.method=fixmatch"]
    config = load_config(SemiConfig, None, [*base, "semi.unlabeled_tiles=[2]"])
    images = unlabeled_images(config, [])
    assert len(images) == 6 and set(images[0]) == {"image", "name", "valid"} and images[0]["image"].shape == (3, 16, 16)
    assert all(images[i]["name"].startswith("tile2_a@") for i in range(6))
    assert all(bool(images[i]["valid"].all()) for i in range(6))  # 16 px crops inside a 30 x 40 tile

    # crops larger than the tile: the zero padding is not a pixel to pseudo-label
    config = load_config(SemiConfig, None, [*base, "data.tile_crop=48", "semi.unlabeled_tiles=[2]",
                                            "semi.self_training_threshold=0.0"])
    images = unlabeled_images(config, [])
    for i in range(len(images)):
        tile_y, tile_x = (-int(v) for v in images[i]["name"].split("@")[1].split("_"))
        expect = torch.zeros(48, 48, dtype=torch.bool)
        expect[tile_y:tile_y + 30, tile_x:tile_x + 40] = True
        assert torch.equal(images[i]["valid"], expect)
    splits = build_datasets(config.data, seed=0)
    batch = pair_collate([LabeledUnlabeledPairs(splits.train, images)[i] for i in range(3)])
    assert torch.equal(batch["valid_u"], torch.stack([images[i]["valid"] for i in range(3)]))
    assert set(batch) >= {"image", "mask", "image_u", "valid_u"} and "valid" not in batch
    model = create("unet", num_classes=2, width=8, depth=2).eval()
    masks, _ = pseudo_label(model, images, config, 255, torch.device("cpu"))
    for i, mask in enumerate(masks):
        inside = images[i]["valid"].numpy()
        assert mask.shape == (48, 48) and (mask[~inside] == 255).all() and (mask[inside] < 2).all()
    # each epoch draws new unlabeled crops (the pairs pass the epoch on to both parts)
    pairs = LabeledUnlabeledPairs(splits.train, images)
    first = [pairs[i]["name_u"] for i in range(len(pairs))]
    pairs.set_epoch(1)
    assert [pairs[i]["name_u"] for i in range(len(pairs))] != first
    pairs.set_epoch(0)
    assert [pairs[i]["name_u"] for i in range(len(pairs))] == first
    with pytest.raises(DataError, match=r"tiles \[1\] are also labeled"):
        unlabeled_images(load_config(SemiConfig, None, [*base, "semi.unlabeled_tiles=[1, 2]"]), [])


def test_unimatch_on_a_vit_initialised_from_a_self_supervised_checkpoint(tmp_path: Path) -> None:
    """``--init`` for a ViT segmenter: with a learning rate too small to move them, the exported
    encoder weights are the checkpoint's, bit for bit, after UniMatch steps (feature stream and
    rotation head included)."""
    from labelwise.models.vit import create_vit
    from labelwise.models.vit_loading import save_vit

    torch.manual_seed(0)
    vit = create_vit("vit_tiny", patch_size=8, depth=2)
    with torch.no_grad():
        for parameter in vit.parameters():
            parameter.add_(0.25)  # unlike any fresh initialisation
    path = save_vit(vit, tmp_path / "vit.safetensors")
    config = _config(tmp_path, "semi.method=unimatch", "semi.rotation_weight=0.5", "model.name=vit_linear",
                     "model.options={arch: vit_tiny, patch_size: 8, depth: 2}", f"model.init={path}",
                     "stages.0.lr=1e-12", "stages.0.steps=2")
    result = train(config)
    exported = load_file(result.run_dir / "weights.safetensors")
    source = vit.state_dict()
    for key, value in source.items():
        assert torch.equal(exported[f"encoder.{key}"].float(), value.float()), key
    assert json.loads((result.run_dir / "init_report.json").read_text())["kind"] == "weights (ViT)"
