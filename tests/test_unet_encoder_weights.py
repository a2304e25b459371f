"""The committed self-supervised U-Net encoder (src/labelwise/weights/unet_dense_moco.safetensors) and its model card.

It initialises the `+ssl` rows of semi_camvid / semi_aerial, so it must load whole into the U-Net
of `configs/semi_camvid.yaml`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from labelwise.config import ModelConfig, load_config
from labelwise.methods import semi
from labelwise.models import create
from labelwise.models.init import initialise_from

ROOT = Path(__file__).resolve().parents[1]
ENCODER = ROOT / "src" / "labelwise" / "weights" / "unet_dense_moco.safetensors"
MODEL_CARD = ROOT / "src" / "labelwise" / "weights" / "README.md"

pytestmark = pytest.mark.skipif(not ENCODER.is_file(), reason=f"{ENCODER} is not present")


def semi_camvid_model_config() -> ModelConfig:
    return load_config(semi.SemiConfig, ROOT / "configs" / "semi_camvid.yaml", ["semi.method=supervised_only"]).model


def semi_camvid_unet() -> torch.nn.Module:
    model = semi_camvid_model_config()
    return create(model.name, num_classes=11, **model.options)


def test_file_is_an_encoder_of_the_semi_recipe_u_net() -> None:
    with safe_open(str(ENCODER), "pt") as handle:
        metadata = handle.metadata()
        names = list(handle.keys())
    assert metadata["format"] == "labelwise_unet_encoder"
    stored = json.loads(metadata["model_config"])
    options = semi_camvid_model_config().options
    assert (stored["width"], stored["depth"]) == (options["width"], options["depth"])
    assert names and all(name.startswith("encoder.") for name in names)


def test_loads_every_encoder_tensor_and_changes_the_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = semi_camvid_unet()
    encoder_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    report = initialise_from(model, ENCODER, run_dir=tmp_path, verbose=False)
    assert report.ignored == []
    assert set(report.loaded) == set(encoder_before), "some encoder tensor was not initialised"
    after = model.state_dict()
    moved = [k for k, v in encoder_before.items() if v.dim() > 0 and not torch.equal(v, after[k])]
    assert len(moved) >= len([v for v in encoder_before.values() if v.dim() > 0]) // 2
    with torch.no_grad():
        logits = model.eval()(torch.rand(1, 3, 64, 96))
    logits = logits.logits if hasattr(logits, "logits") else logits
    assert logits.shape == (1, 11, 64, 96) and torch.isfinite(logits).all()


def test_model_card_names_the_file_its_recipe_and_command() -> None:
    text = MODEL_CARD.read_text()
    assert "unet_dense_moco.safetensors" in text
    assert "configs/pretrain_unet_dense_moco.yaml" in text and "benchmarks/pretrain_dino.py" in text
