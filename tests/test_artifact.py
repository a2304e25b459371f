"""The one model artifact (model.json + weights.safetensors): round trips against the original
module's forward, older folders, errors that name the file, crash safety, and the unsupervised
cluster segmenter against a per-pixel reference computation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from labelwise.config import EvalConfig
from labelwise.data import ClassMap
from labelwise.errors import CheckpointError
from labelwise.models import artifact as artifact_module
from labelwise.models import create
from labelwise.models.artifact import WEIGHTS_FILE, is_artifact, load_artifact, save_artifact
from labelwise.models.clusters import ClusterSegmenter
from labelwise.models.export import export_model, load_model
from labelwise.models.heads import ProjectionHead
from labelwise.models.vit import create_vit
from labelwise.models.vit_loading import save_vit

CLASSES = ClassMap.from_names(["sky", "road", "car"])


def _unet(seed: int = 0):
    torch.manual_seed(seed)
    return create("unet", num_classes=3, width=8, depth=2).eval()


def _images(seed: int = 1, size=(2, 3, 37, 45)) -> torch.Tensor:
    return torch.rand(size, generator=torch.Generator().manual_seed(seed))


def test_segmenter_round_trip_reproduces_the_original_forward(tmp_path):
    model = _unet()
    export_model(tmp_path / "run", model, CLASSES, EvalConfig(flip=True), data={"dataset": "synthetic"},
                 init="weights/encoder.safetensors")
    info = json.loads((tmp_path / "run" / "model.json").read_text())
    assert info["format"] == "labelwise-artifact/1" and info["kind"] == "segmenter"
    assert info["class_map"]["classes"] == ["sky", "road", "car"]
    assert info["architecture"]["name"] == "unet" and info["architecture"]["num_classes"] == 3
    assert info["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert info["source"]["init"] == "weights/encoder.safetensors"
    assert info["training"]["data"] == {"dataset": "synthetic"} and info["training"]["command"]
    assert info["eval"]["flip"] is True
    loaded = load_model(tmp_path / "run")
    assert loaded.eval_config.flip and loaded.class_map.names == CLASSES.names
    images = _images()
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))


def test_an_older_segmenter_folder_still_loads(tmp_path):
    """labelwise 0.1 wrote model.json (format labelwise-model/1, architecture under "model") +
    model.safetensors; the folder is written here by hand, as that version did."""
    model = _unet(seed=3)
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({
        "format": "labelwise-model/1", "labelwise_version": "0.1.0", "model": model.config(),
        "class_map": CLASSES.to_dict(), "eval": {"window": None, "overlap": 0.5}}))
    loaded = load_model(folder)
    images = _images(seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), model(images))


def test_unknown_format_and_missing_files_are_named(tmp_path):
    export_model(tmp_path / "run", _unet(), CLASSES, EvalConfig())
    info_path = tmp_path / "run" / "model.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "format": "labelwise-artifact/99"}))
    with pytest.raises(CheckpointError, match=r"model\.json: unknown model format 'labelwise-artifact/99'"):
        load_model(tmp_path / "run")
    info_path.write_text(json.dumps(info))
    weights = tmp_path / "run" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: weights file is (truncated or )?corrupt"):
        load_model(tmp_path / "run")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: weights file is missing"):
        load_model(tmp_path / "run")
    with pytest.raises(CheckpointError, match="not a labelwise model folder"):
        load_model(tmp_path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    export_model(tmp_path / "run", _unet(), CLASSES, EvalConfig())
    info_path = tmp_path / "run" / "model.json"
    info = json.loads(info_path.read_text())
    info["architecture"]["width"] = 16
    info_path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path / "run")


@pytest.mark.parametrize("marker, message", [("mct.json", "weak-supervision classifier"),
                                             ("pretrain.json", "pretrained backbone")])
def test_older_folders_of_other_stages_say_what_they_are(tmp_path, marker, message):
    (tmp_path / marker).write_text("{}")
    with pytest.raises(CheckpointError, match=message):
        load_artifact(tmp_path)


@pytest.mark.parametrize("kind, message", [("classifier", "weak-supervision classifier"),
                                           ("backbone", "pretrained backbone")])
def test_artifacts_that_hold_no_segmenter_say_what_they_are(tmp_path, kind, message):
    save_artifact(tmp_path / "run", kind, nn.Linear(2, 2), {"any": 1}, None)
    with pytest.raises(CheckpointError, match=message):
        load_artifact(tmp_path / "run")


def test_a_weak_run_folder_loads_as_the_segmenter_trained_on_its_pseudo_masks(tmp_path):
    model = _unet()
    save_artifact(tmp_path / "run", "classifier", nn.Linear(2, 2), {"any": 1}, CLASSES)
    export_model(tmp_path / "run" / "segmenter", model, CLASSES, EvalConfig())
    loaded = load_artifact(tmp_path / "run")
    assert loaded.kind == "segmenter" and loaded.folder == tmp_path / "run" / "segmenter"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def test_a_weak_run_with_self_training_loads_the_segmenter_its_report_names(tmp_path):
    first, last = _unet(), _unet()
    with torch.no_grad():
        for parameter in last.parameters():
            parameter.add_(1.0)
    save_artifact(tmp_path / "run", "classifier", nn.Linear(2, 2), {"any": 1}, CLASSES)
    export_model(tmp_path / "run" / "segmenter", first, CLASSES, EvalConfig())
    export_model(tmp_path / "run" / "self_training" / "round1" / "segmenter", last, CLASSES, EvalConfig())
    report = tmp_path / "run" / "weak_run.json"
    for named in ("../elsewhere", str(tmp_path / "run" / "segmenter"), "self_training/round9/segmenter"):
        report.write_text(json.dumps({"model_subfolder": named}))  # outside, absolute, unfinished: ignored
        assert load_artifact(tmp_path / "run").folder == tmp_path / "run" / "segmenter"
    report.write_text(json.dumps({"model_subfolder": "self_training/round1/segmenter"}))
    loaded = load_artifact(tmp_path / "run")
    assert loaded.folder == tmp_path / "run" / "self_training" / "round1" / "segmenter"
    for key, value in last.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def test_a_crash_while_writing_weights_leaves_no_model_json(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact_module, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(tmp_path / "run", _unet(), CLASSES, EvalConfig())
    assert not is_artifact(tmp_path / "run") and not (tmp_path / "run" / WEIGHTS_FILE).exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == []


def _vit():
    torch.manual_seed(5)
    return create_vit("vit_tiny", patch_size=8, depth=2).eval()


def _reference_cluster_scores(vit, head, centroids, images):
    """Per pixel: cosine similarity of the (nearest-upsampled is *not* used) bilinearly resized
    code map to each centroid, written with explicit normalisation and cosine_similarity."""
    with torch.no_grad():
        features = vit(images).patch_tokens.float()
        codes = head(features) if head is not None else features
        b, c, h, w = codes.shape
        sims = F.cosine_similarity(codes[:, None], centroids[None, :, :, None, None], dim=2)  # [B, K, h, w]
        stride = vit.patch_size
        up = F.interpolate(sims, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    return up[..., : images.shape[-2], : images.shape[-1]]


@pytest.mark.parametrize("with_head", [True, False])
def test_cluster_segmenter_matches_a_per_pixel_reference_and_round_trips(tmp_path, with_head):
    vit = _vit()
    torch.manual_seed(6)
    head = ProjectionHead(vit.embed_dim, 16).eval() if with_head else None
    centroids = torch.randn(4, 16 if with_head else vit.embed_dim)
    module = ClusterSegmenter(vit, centroids, head).eval()
    images = _images(seed=7, size=(2, 3, 30, 41))
    with torch.no_grad():
        scores = module(images)
    assert scores.shape == (2, 4, 30, 41)
    torch.testing.assert_close(scores, _reference_cluster_scores(vit, head, centroids, images), atol=1e-5, rtol=0)
    save_artifact(tmp_path / "u", "clusters", module, module.config(), artifact_module.cluster_class_map(4))
    loaded = load_artifact(tmp_path / "u")
    assert loaded.kind == "clusters" and loaded.class_map.names[0] == "cluster_0"
    with torch.no_grad():
        assert torch.equal(loaded.module(images), scores)


def test_an_older_unsupervised_folder_loads_with_its_backbone_by_reference(tmp_path):
    vit = _vit()
    backbone_file = save_vit(vit, tmp_path / "vit.safetensors")
    torch.manual_seed(8)
    head = ProjectionHead(vit.embed_dim, 12).eval()
    centroids = torch.randn(3, 12)
    folder = tmp_path / "unsup"
    folder.mkdir()
    save_file({**{f"head.{k}": v.contiguous() for k, v in head.state_dict().items()}, "centroids": centroids},
              str(folder / "head.safetensors"))
    (folder / "unsupervised.json").write_text(json.dumps({"method": "hp", "in_dim": vit.embed_dim, "dim": 12,
                                                          "backbone": str(backbone_file), "clusters": 3}))
    loaded = load_artifact(folder)
    images = _images(seed=9, size=(1, 3, 24, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(images), _reference_cluster_scores(vit, head, centroids, images),
                                   atol=1e-5, rtol=0)
    (folder / "unsupervised.json").write_text(json.dumps({"method": "hp", "in_dim": vit.embed_dim, "dim": 12,
                                                          "backbone": str(tmp_path / "gone.safetensors")}))
    with pytest.raises(CheckpointError, match="names its backbone"):
        load_artifact(folder)
