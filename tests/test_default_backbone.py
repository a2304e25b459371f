"""The committed default backbone (src/labelwise/weights/labelwise_vit.safetensors) and its model card."""

from __future__ import annotations

import re

import pytest
import torch

from labelwise.models.vit import VisionTransformer
from labelwise.models.vit_loading import DEFAULT_BACKBONE_PATH, load_vit, resolve_backbone

MODEL_CARD = DEFAULT_BACKBONE_PATH.parent / "README.md"

pytestmark = pytest.mark.skipif(not DEFAULT_BACKBONE_PATH.is_file(),
                                reason=f"{DEFAULT_BACKBONE_PATH} is not present (rebuild: benchmarks/pretrain_dino.py)")


def test_default_name_resolves_to_the_committed_file() -> None:
    assert resolve_backbone("labelwise_default") == DEFAULT_BACKBONE_PATH
    assert DEFAULT_BACKBONE_PATH.stat().st_size <= 50 * 2**20


def test_loads_as_vit_tiny_16_and_gives_finite_features() -> None:
    vit = load_vit("labelwise_default").eval()
    assert (vit.config.arch, vit.patch_size, vit.embed_dim, vit.depth) == ("vit_tiny", 16, 192, 12)
    with torch.no_grad():
        out = vit(torch.rand(2, 3, 70, 90))
    assert out.patch_tokens.shape == (2, 192, 5, 6)
    assert torch.isfinite(out.patch_tokens).all() and torch.isfinite(out.cls_token).all()


def test_weights_are_trained_not_an_initialisation() -> None:
    """A freshly initialised ViT has zero linear biases and unit LayerNorm weights (DINO init);
    pretraining moves both."""
    vit = load_vit("labelwise_default")
    fresh = VisionTransformer(vit.config)
    trained = dict(vit.named_parameters())
    for name, init in fresh.named_parameters():
        if name.endswith("norm1.weight") or name.endswith("attn.qkv.bias"):
            assert not torch.equal(trained[name], init), f"{name} is still at its initial value"


def test_model_card_states_command_data_duration_and_probe_numbers() -> None:
    text = MODEL_CARD.read_text()
    assert "benchmarks/pretrain_dino.py" in text and "configs/pretrain_vit_tiny.yaml" in text
    assert "../shared/data/unlabeled" in text
    assert "__" not in text, "model card still has unfilled placeholders"
    assert re.search(r"linear_probe \| \d\.\d{3}", text), "model card lacks the linear-probe mIoU"
