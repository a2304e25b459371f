"""Pretraining runs: EMA teacher, learning on a fixed batch, exact resume, export, CLI, config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from labelwise.cli import PRETRAIN_METHODS, build_parser, main
from labelwise.config import load_config
from labelwise.errors import CheckpointError, ConfigError
from labelwise.io.checkpoint import latest_checkpoint_dir
from labelwise.methods import pretrain
from labelwise.methods.pretrain import PretrainConfig, build_objective, cosine_schedule, ema_update
from labelwise.models import create
from labelwise.models.vit_loading import load_vit

PROJECT = Path(__file__).resolve().parents[1]

#: A tiny ViT (embed 48, depth 2, patch 8) with small heads and 32 / 16 px crops.
TINY = [
    "backbone.arch=custom", "backbone.patch_size=8", "backbone.options={embed_dim: 48, depth: 2, num_heads: 3}",
    "multicrop.global_size=32", "multicrop.local_size=16", "multicrop.local_crops=2",
    "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.patch_out_dim=64",
    "moco.hidden_dim=32", "moco.dim=16", "moco.queue_size=16", "data.batch_size=4",
    "device=cpu", "progress=false", "log_every=1",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (conftest)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """12 small random-texture images of varied sizes in two sub-folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for index in range(12):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # upsampled: textures with structure
        image = Image.fromarray(base).resize((40 + 2 * index, 36 + index), Image.BILINEAR)
        image.save(folder / f"img{index:02d}.png")
    return root


def _config(image_folder: Path, run_dir: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [f"data.images=[{image_folder}]", f"run_dir={run_dir}", *TINY, *extra])


# ----------------------------------------------------------------------------- pieces


def test_ema_update_is_exact() -> None:
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, 0.9 * before[key] + (1 - 0.9) * student.state_dict()[key])
    with pytest.raises(ValueError, match="different parameters"):
        ema_update(torch.nn.Linear(4, 3, bias=False), student, 0.9)


def test_objective_momentum_update_covers_backbone_and_heads(image_folder: Path, tmp_path: Path) -> None:
    config = _config(image_folder, tmp_path / "run", "dino.ibot=true")
    objective = build_objective(config)
    for param in objective.student.parameters():
        param.data.add_(1.0)
    teacher_before = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    student = objective.student.state_dict()
    objective.momentum_update(0.75)
    for key, value in objective.teacher.state_dict().items():
        assert torch.equal(value, 0.75 * teacher_before[key] + (1 - 0.75) * student[key]), key
    assert not any(p.requires_grad for p in objective.teacher.parameters())
    assert not any(p.requires_grad for p in objective.teacher_head.parameters())
    assert len(objective.ema_pairs()) == 3  # backbone, [CLS] head, patch head


def test_cosine_schedule() -> None:
    assert cosine_schedule(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_schedule(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_schedule(25, 100, 0.0, 1.0) == pytest.approx(0.5 * (1 - np.cos(np.pi / 4)))


@pytest.mark.parametrize("ibot", [False, True])
def test_repeated_steps_on_a_fixed_batch_decrease_the_dino_loss(image_folder: Path, tmp_path: Path, ibot: bool) -> None:
    torch.manual_seed(0)
    config = _config(image_folder, tmp_path / "run", f"dino.ibot={str(ibot).lower()}", "dino.mask_prob=1.0")
    objective = build_objective(config)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    inputs = {"global": torch.rand(8, 3, 32, 32), "local": torch.rand(8, 3, 16, 16),
              "boxes": torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 1.0, 1.0]]] * 4),
              "flips": torch.zeros(4, 2, dtype=torch.bool)}
    inputs.update(objective.prepare(inputs, torch.Generator().manual_seed(0)))
    assert ("masks" in inputs) == ibot
    losses = []
    for step in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logs = objective(inputs, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.momentum_update(0.9)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert ("loss_ibot" in logs) == ibot


def test_ibot_step_without_masked_patches_still_reaches_every_parameter(image_folder: Path, tmp_path: Path) -> None:
    """DDP needs a gradient (zero is fine) for every trainable parameter at every step."""
    objective = build_objective(_config(image_folder, tmp_path / "run", "dino.ibot=true", "dino.mask_prob=0.0"))
    inputs = {"global": torch.rand(4, 3, 32, 32), "local": torch.rand(4, 3, 16, 16)}
    inputs.update(objective.prepare(inputs, torch.Generator()))
    assert not inputs["masks"].any()
    loss, logs = objective(inputs, 0)
    loss.backward()
    assert float(logs["loss_ibot"]) == 0.0 and torch.isfinite(loss)
    missing = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert torch.equal(objective.patch_loss.center, torch.zeros_like(objective.patch_loss.center))


# ----------------------------------------------------------------------------- runs


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = latest_checkpoint_dir(run_dir)
    assert folder is not None
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method, extra", [
    ("dino", ["dino.ibot=true", "dino.freeze_last_layer_steps=2", "dino.warmup_teacher_temp_steps=3",
              "dino.teacher_temp=0.06"]),
    ("dense_moco", ["backbone.kind=unet", "backbone.options={width: 8, depth: 2}", "data.num_workers=1"]),
])
def test_resume_gives_identical_student_and_teacher(image_folder: Path, tmp_path: Path, method: str,
                                                    extra: list[str]) -> None:
    settings = [f"method={method}", "stages.0.steps=6", "checkpoint_every=4", *extra]  # 3 batches per epoch
    straight = pretrain.train(_config(image_folder, tmp_path / "straight", *settings))
    assert straight.train.steps == 6 and straight.backbone_path is not None

    interrupted = _config(image_folder, tmp_path / "interrupted", *settings)
    partial = pretrain.train(interrupted, stop_at=3)
    assert partial.backbone_path is None and not (tmp_path / "interrupted" / "weights.safetensors").exists()
    with pytest.raises(CheckpointError, match="--resume"):
        pretrain.train(interrupted)
    resumed = pretrain.train(interrupted, resume=True)
    assert resumed.train.steps == 6

    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "interrupted")
    assert a.keys() == b.keys()
    assert any(k.startswith("teacher.") for k in a) and any(k.startswith("student.") for k in a)
    assert any("center" in k or "queue" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    exported_a = load_file(str(straight.backbone_path))
    exported_b = load_file(str(resumed.backbone_path))
    for key in exported_a:
        assert torch.equal(exported_a[key], exported_b[key]), key
    log = [json.loads(line) for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["weight_decay"] == pytest.approx(cosine_schedule(5, 6, 0.04, 0.4))

    # resuming a finished run trains nothing and keeps the record of the trained steps
    summary = json.loads((tmp_path / "interrupted" / "model.json").read_text())["pretrain"]
    assert summary["last_logs"]["loss"] == pytest.approx(log[-1]["loss"])
    again = pretrain.train(interrupted, resume=True)
    assert again.train.steps == 6 and again.summary["last_logs"] == summary["last_logs"]
    assert json.loads((tmp_path / "interrupted" / "model.json").read_text())["pretrain"]["last_logs"] == summary["last_logs"]


@pytest.mark.parametrize("frozen_steps", [0, 2])
def test_freeze_last_layer(image_folder: Path, tmp_path: Path, frozen_steps: int) -> None:
    from labelwise.engine.runtime import seed_everything

    config = _config(image_folder, tmp_path / "run", "stages.0.steps=2", f"dino.freeze_last_layer_steps={frozen_steps}")
    seed_everything(config.seed)
    initial = build_objective(config).student_head.weight_v.detach().clone()  # what train() builds first
    pretrain.train(config)
    final = _final_state(tmp_path / "run")["student_head.weight_v"]
    assert torch.equal(final, initial) == (frozen_steps == 2)
    assert not torch.equal(_final_state(tmp_path / "run")["student_head.mlp.0.weight"],
                           build_objective(config).student_head.mlp[0].weight)


def test_dino_run_exports_a_loadable_teacher_vit(image_folder: Path, tmp_path: Path) -> None:
    result = pretrain.train(_config(image_folder, tmp_path / "run", "stages.0.steps=2"))
    summary = json.loads((tmp_path / "run" / "model.json").read_text())["pretrain"]
    assert summary["images_seen"] == 8 and summary["epochs"] == pytest.approx(8 / 12)
    assert summary["images_per_second"] > 0 and summary["train_seconds"] > 0
    assert summary["exported"] == "teacher" and summary["steps"] == 2
    vit = load_vit(result.backbone_path)
    state = _final_state(tmp_path / "run")
    for key, value in vit.state_dict().items():
        assert torch.equal(value, state[f"teacher.vit.{key}"]), key
    assert vit.config.drop_path == 0.0 and vit.embed_dim == 48
    out = vit(torch.rand(1, 3, 32, 32))
    assert out.patch_tokens.shape == (1, 48, 4, 4)


def test_init_continues_from_an_exported_backbone(image_folder: Path, tmp_path: Path) -> None:
    first = pretrain.train(_config(image_folder, tmp_path / "first", "method=dense_moco", "stages.0.steps=2"))
    source = load_vit(first.backbone_path).state_dict()
    config = _config(image_folder, tmp_path / "second", "method=dense_moco", "stages.0.steps=1",
                     f"init={first.backbone_path}")
    objective = build_objective(config, tmp_path / "second")
    for name, network in (("student", objective.student), ("teacher", objective.teacher)):
        state = network.vit.state_dict()
        for key, value in source.items():
            assert torch.equal(state[key], value), f"{name}: {key}"
    report = json.loads((tmp_path / "second" / "init_report.json").read_text())
    assert "pos_embed" in report["loaded"] and not report["ignored"]
    # a fresh objective without init differs from the source, so the check above is not vacuous
    fresh = build_objective(_config(image_folder, tmp_path / "third", "method=dense_moco", "stages.0.steps=1"))
    assert not torch.equal(fresh.student.vit.state_dict()["pos_embed"], source["pos_embed"])
    result = pretrain.train(config)
    assert result.backbone_path is not None and (tmp_path / "second" / "init_report.json").exists()


def test_init_from_a_missing_file_names_it(image_folder: Path, tmp_path: Path) -> None:
    config = _config(image_folder, tmp_path / "run", "method=dense_moco", "stages.0.steps=1",
                     f"init={tmp_path / 'nope.safetensors'}")
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        pretrain.train(config)


@pytest.mark.parametrize("method", ["moco", "rotation"])
def test_unet_encoder_export(image_folder: Path, tmp_path: Path, method: str) -> None:
    result = pretrain.train(_config(image_folder, tmp_path / "run", f"method={method}", "stages.0.steps=2",
                                    "backbone.kind=unet", "backbone.options={width: 8, depth: 2}"))
    with safe_open(str(result.backbone_path), "pt") as handle:
        options = json.loads(handle.metadata()["model_config"])
    model = create(options.pop("name"), num_classes=3, **{k: v for k, v in options.items() if k != "num_classes"})
    weights = load_file(str(result.backbone_path))
    assert weights and all(k.startswith("encoder.") for k in weights)
    missing = model.load_state_dict(weights, strict=False).missing_keys
    assert not any(k.startswith("encoder.") for k in missing)
    which = "teacher" if method == "moco" else "student"
    state = _final_state(tmp_path / "run")
    for key, value in weights.items():
        assert torch.equal(value, state[f"{which}.{key}"]), key


# ----------------------------------------------------------------------------- config and CLI


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    base = ["data.images=[x]"]
    with pytest.raises(ConfigError, match="data.images"):
        load_config(PretrainConfig, None, [])
    with pytest.raises(ConfigError, match="dino.ibot"):
        load_config(PretrainConfig, None, [*base, "dino.ibot=true", "backbone.kind=unet"])
    with pytest.raises(ConfigError, match="epochs"):
        load_config(PretrainConfig, None, [*base, "epochs=0"])
    with pytest.raises(ConfigError, match="stages: pretraining trains in one stage"):
        load_config(PretrainConfig, None, [*base, "stages.1.steps=5"])
    with pytest.raises(ConfigError, match="moco.temperature"):
        load_config(PretrainConfig, None, [*base, "method=moco", "moco.temperature=0"])
    with pytest.raises(ConfigError, match="multicrop.local_crops"):
        load_config(PretrainConfig, None, [*base, "multicrop.local_crops=-1"])
    with pytest.raises(ConfigError, match="backbone.options.drop_path"):
        load_config(PretrainConfig, None, [*base, "backbone.options={drop_path: 0.2}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dino:\n  prototypes: 10\n")
    with pytest.raises(ConfigError, match="dino.prototypes"):
        load_config(PretrainConfig, bad)


def test_cpu_recipe_config_loads() -> None:
    config = load_config(PretrainConfig, PROJECT / "configs" / "pretrain_dino_vit_tiny.yaml")
    assert (config.method, config.backbone.arch, config.backbone.patch_size) == ("dino", "vit_tiny", 16)
    assert (config.multicrop.global_size, config.multicrop.local_size) == (96, 48)
    assert config.dino.ibot and config.precision == "bf16"
    assert all(path.startswith("../shared/data/") for path in config.data.images)


def test_default_backbone_recipe_config_loads() -> None:
    config = load_config(PretrainConfig, PROJECT / "configs" / "pretrain_vit_tiny.yaml")
    config.validate()
    assert (config.method, config.backbone.arch, config.backbone.patch_size) == ("dense_moco", "vit_tiny", 16)
    assert config.moco.queue_size == 0 and config.multicrop.global_size == 128
    assert all(path.startswith("../shared/data/") for path in config.data.images)


def test_cli_help_states_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices["pretrain"]  # noqa: SLF001
    for action in sub._actions:  # noqa: SLF001
        if action.option_strings and action.dest != "help":
            assert action.help and "default" in (action.help + " (default").lower()
            assert any(opt in text for opt in action.option_strings)
    assert PRETRAIN_METHODS == pretrain.METHODS


def test_cli_end_to_end(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "cli run"
    args = ["pretrain", "--images", str(image_folder / "a"), str(image_folder / "b"), "--method", "dino",
            "--steps", "2", "--run-dir", str(run_dir), "--device", "cpu", "--precision", "bf16"]
    args += [item for setting in TINY if not setting.startswith(("device", "progress")) for item in ("--set", setting)]
    args += ["--set", "progress=false"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and printed["images_seen"] == 8
    assert (run_dir / "weights.safetensors").exists() and (run_dir / "config.yaml").exists()
    assert load_vit(run_dir / "weights.safetensors").embed_dim == 48
    # the run folder is the project's model artifact, of kind backbone: the folder names the ViT too
    info = json.loads((run_dir / "model.json").read_text())
    assert info["format"] == "labelwise-artifact/1" and info["kind"] == "backbone"
    assert info["architecture"]["backbone"]["kind"] == "vit" and info["pretrain"]["steps"] == 2
    assert info["training"]["command"] and info["source"]["method"] == "dino"
    assert torch.equal(load_vit(run_dir).cls_token, load_vit(run_dir / "weights.safetensors").cls_token)
    from labelwise.models.artifact import load_artifact

    with pytest.raises(CheckpointError, match="pretrained backbone, which predicts no classes"):
        load_artifact(run_dir)
    # again without --resume / --overwrite: refused, exit status 2 with the reason
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--images", str(tmp_path / "missing"), "--run-dir", str(tmp_path / "x")]) == 2
    assert "missing: image folder not found" in capsys.readouterr().err
    assert main(["pretrain", "--images", str(image_folder), "--set", "dino.k=3"]) == 2
    assert "dino.k" in capsys.readouterr().err
