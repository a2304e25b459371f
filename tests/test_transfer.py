"""initialise_from: exact loaded / new / ignored lists, weights really copied, and `train --init`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from labelwise.cli import main
from labelwise.config import EvalConfig, to_dict
from labelwise.data import ClassMap
from labelwise.errors import CheckpointError
from labelwise.models import create
from labelwise.models.export import export_model, load_model
from labelwise.models.init import initialise_from
from labelwise.models.vit import create_vit
from labelwise.models.vit_loading import save_vit


def unet(num_classes: int, seed: int, **options):
    torch.manual_seed(seed)
    return create("unet", num_classes=num_classes, width=8, depth=2, **options)


def export(model, folder, num_classes):
    export_model(folder, model, ClassMap.from_names([f"c{i}" for i in range(num_classes)]), EvalConfig())
    return folder


def test_unet_from_unet_export_with_other_num_classes(tmp_path):
    source = unet(3, seed=1)
    export(source, tmp_path / "src", 3)
    target = unet(5, seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = initialise_from(target, tmp_path / "src", run_dir=tmp_path / "run", verbose=False)

    src_state, own = source.state_dict(), target.state_dict()
    encoder = sorted(k for k in own if k.startswith("encoder."))
    assert report.kind == "labelwise-model"
    assert report.loaded == encoder
    assert report.new == sorted(k for k in own if not k.startswith("encoder."))
    assert [i["name"] for i in report.ignored] == sorted(k for k in src_state if not k.startswith("encoder."))
    assert {i["reason"] for i in report.ignored} == {"outside the encoder"}
    for key in own:
        expected = src_state[key] if key in encoder else before[key]
        assert torch.equal(own[key], expected), key
    saved = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert saved["loaded"] == report.loaded and saved["counts"]["ignored"] == len(report.ignored)


def test_shape_mismatches_are_reported_with_both_shapes(tmp_path):
    source = unet(3, seed=1, max_width=8)  # deeper stages keep 8 channels instead of 16
    export(source, tmp_path / "src", 3)
    target = unet(3, seed=2)
    report = initialise_from(target, tmp_path / "src", verbose=False)
    src_state, own = source.state_dict(), target.state_dict()
    same = sorted(k for k in own if k.startswith("encoder.") and src_state[k].shape == own[k].shape)
    differ = sorted(k for k in own if k.startswith("encoder.") and src_state[k].shape != own[k].shape)
    assert differ and same
    assert report.loaded == same
    assert report.new == sorted(set(own) - set(same))
    mismatched = [i for i in report.ignored if i["reason"] == "shape mismatch"]
    assert [i["name"] for i in mismatched] == differ
    for item in mismatched:
        assert item["checkpoint_shape"] == list(src_state[item["name"]].shape)
        assert item["model_shape"] == list(own[item["name"]].shape)
    assert "shape mismatch" in report.summary()


def test_nothing_matching_is_an_error(tmp_path):
    export(unet(3, seed=1, max_width=4, block="conv"), tmp_path / "src", 3)
    torch.manual_seed(0)
    with pytest.raises(CheckpointError, match="no tensor matches"):
        initialise_from(create("unet", num_classes=3, width=16, depth=2), tmp_path / "src", verbose=False)
    with pytest.raises(CheckpointError, match="nothing"):
        initialise_from(unet(3, seed=0), tmp_path / "nothing", verbose=False)


def test_unet_from_pretraining_backbone_file(tmp_path):
    source = unet(3, seed=1)
    run = tmp_path / "pretrain"
    run.mkdir()
    tensors = {f"backbone.{k}": v for k, v in source.encoder.state_dict().items()}
    tensors["projector.weight"] = torch.ones(4, 4)
    save_file(tensors, str(run / "backbone.safetensors"))
    target = unet(6, seed=2)
    report = initialise_from(target, run, verbose=False)
    assert report.kind == "backbone"
    assert report.loaded == sorted(f"encoder.{k}" for k in source.encoder.state_dict())
    assert report.ignored == [{"name": "projector.weight", "reason": "outside the encoder",
                               "checkpoint_shape": [4, 4], "model_shape": None}]
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[key], value)
    # the pretraining export's own layout: the encoder's tensors under their full-model names
    save_file({f"encoder.{k}": v for k, v in source.encoder.state_dict().items()}, str(run / "backbone.safetensors"))
    report = initialise_from(unet(2, seed=3), run / "backbone.safetensors", verbose=False)
    assert report.loaded == sorted(f"encoder.{k}" for k in source.encoder.state_dict()) and report.ignored == []


def test_unet_from_a_pretraining_run_folder_of_the_artifact_layout(tmp_path):
    from labelwise.models.artifact import write_artifact_info

    source = unet(3, seed=1)
    run = tmp_path / "pretrain"
    run.mkdir()
    save_file({f"encoder.{k}": v for k, v in source.encoder.state_dict().items()}, str(run / "weights.safetensors"))
    write_artifact_info(run, "backbone", {"backbone": {"kind": "unet"}}, None)
    for where in (run, run / "weights.safetensors"):  # the run folder or its weights file
        target = unet(6, seed=2)
        report = initialise_from(target, where, verbose=False)
        assert report.kind == "backbone" and report.ignored == []
        assert report.loaded == sorted(f"encoder.{k}" for k in source.encoder.state_dict())
        for key, value in source.encoder.state_dict().items():
            assert torch.equal(target.encoder.state_dict()[key], value)


def test_vit_linear_from_saved_vit(tmp_path):
    torch.manual_seed(0)
    # one block more, patch 8 instead of 16, a 7x7 position grid instead of 14x14
    vit = create_vit("vit_tiny", patch_size=8, depth=13, pos_grid=7)
    path = save_vit(vit, tmp_path / "vit.safetensors")
    model = create("vit_linear", num_classes=3, arch="vit_tiny", patch_size=16)
    report = initialise_from(model, path, verbose=False)
    own, src = model.state_dict(), vit.state_dict()
    encoder = {k for k in own if k.startswith("encoder.")}
    assert report.kind == "weights (ViT)"
    assert report.loaded == sorted(encoder - {"encoder.patch_embed.proj.weight"})
    assert report.new == sorted((set(own) - encoder) | {"encoder.patch_embed.proj.weight"})
    assert report.ignored == sorted(
        [{"name": k, "reason": "not in the model", "checkpoint_shape": list(v.shape), "model_shape": None}
         for k, v in src.items() if k.startswith("blocks.12.")]
        + [{"name": "patch_embed.proj.weight", "reason": "shape mismatch", "checkpoint_shape": [192, 3, 8, 8],
            "model_shape": [192, 3, 16, 16]}], key=lambda item: item["name"])
    assert torch.equal(own["encoder.blocks.11.mlp.fc2.weight"], src["blocks.11.mlp.fc2.weight"])
    assert own["encoder.pos_embed"].shape == (1, 197, 192) and torch.equal(own["encoder.pos_embed"][:, 0],
                                                                          src["pos_embed"][:, 0])
    assert any("pos_embed" in note for note in report.notes)


def test_vit_linear_from_dino_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    vit = create_vit("vit_tiny", patch_size=16)
    checkpoint = {"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()},
                  "student": {f"backbone.{k}": torch.zeros_like(v) for k, v in vit.state_dict().items()}}
    checkpoint["teacher"]["head.last_layer.weight"] = torch.ones(8, 192)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    model = create("vit_linear", num_classes=2, arch="vit_tiny", patch_size=16)
    report = initialise_from(model, tmp_path / "checkpoint.pth", verbose=False)
    assert report.loaded == sorted(k for k in model.state_dict() if k.startswith("encoder."))
    assert report.ignored == []  # the DINO head is dropped by the format conversion
    assert torch.equal(model.encoder.cls_token, vit.cls_token)


def test_train_init_end_to_end(tmp_path, tiny_config, capsys):
    source = unet(7, seed=5)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.5)  # unlike any fresh initialisation
    export(source, tmp_path / "pretrained", 7)
    tiny_config.stages[0].steps = 2
    tiny_config.stages[0].warmup_steps = 0
    tiny_config.stages[0].lr = 1e-12  # training does not move the weights: what is exported is the init
    tiny_config.checkpoint_every = 1
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(tiny_config)))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config_path), "--run-dir", str(run), "--init", str(tmp_path / "pretrained"),
                 "--device", "cpu"]) == 0
    assert "init from" in capsys.readouterr().out
    report = json.loads((run / "init_report.json").read_text())
    trained = load_model(run).model.state_dict()
    source_state = source.state_dict()
    weights = [k for k in trained if k.endswith(".weight") and trained[k].dim() == 4]
    assert report["loaded"] == sorted(k for k in trained if k.startswith("encoder."))
    for key in weights:
        if key.startswith("encoder."):
            torch.testing.assert_close(trained[key], source_state[key], rtol=0, atol=1e-6)
        elif source_state[key].shape == trained[key].shape:
            assert not torch.allclose(trained[key], source_state[key], atol=0.1), key  # the decoder was not loaded
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init"] == str(tmp_path / "pretrained")

    # resuming does not initialise again: the checkpoint wins
    (run / "init_report.json").unlink()
    from labelwise.methods import supervised

    tiny_config.run_dir = str(tmp_path / "run2")
    tiny_config.model.init = str(tmp_path / "pretrained")
    supervised.train(tiny_config, stop_at=1)
    assert (tmp_path / "run2" / "init_report.json").exists()
    (tmp_path / "run2" / "init_report.json").unlink()
    supervised.train(tiny_config, resume=True)
    assert not (tmp_path / "run2" / "init_report.json").exists()
