"""MCTformer CAMs: untagged classes are zero, tagged ones normalised to a maximum of 1, flip
test-time augmentation is mirror-equivariant, affinity refinement equals its literal sum."""

from __future__ import annotations

import pytest
import torch

from labelwise.errors import ConfigError
from labelwise.methods.weak.cams import CAMConfig, class_activation_maps, refine_with_affinity
from labelwise.models.mctformer import MultiClassTokenViT
from labelwise.models.vit import VisionTransformer, ViTConfig


def _model(variant: str = "v2", seed: int = 0) -> MultiClassTokenViT:
    torch.manual_seed(seed)
    backbone = VisionTransformer(ViTConfig(arch="custom", embed_dim=16, depth=3, num_heads=2, patch_size=8,
                                           pos_grid=3))
    model = MultiClassTokenViT(backbone, num_classes=4, variant=variant).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("fusion", ["product", "geometric_mean", "attention"])
def test_untagged_classes_are_zero_and_tagged_ones_peak_at_one(fusion: str) -> None:
    model = _model()
    images = torch.rand(2, 3, 24, 32)
    tags = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    cams = class_activation_maps(model, images, tags, CAMConfig(blocks=2, fusion=fusion, scales=[1.0, 0.75]))
    assert cams.shape == (2, 4, 24, 32)
    assert torch.all(cams[~tags] == 0)
    peaks = cams.flatten(2).amax(2)
    for b, k in tags.nonzero().tolist():
        assert float(peaks[b, k]) == pytest.approx(1.0) or float(peaks[b, k]) == 0.0
    assert cams.min() >= 0


def test_flip_augmentation_is_mirror_equivariant() -> None:
    model = _model(seed=1)
    images = torch.rand(1, 3, 16, 20)  # 20 px: the padded column moves to the other side when mirrored
    tags = torch.ones(1, 4, dtype=torch.bool)
    config = CAMConfig(blocks=2, flip=True)
    direct = class_activation_maps(model, images, tags, config)
    mirrored = class_activation_maps(model, images.flip(-1), tags, config)
    torch.testing.assert_close(mirrored, direct.flip(-1), rtol=1e-4, atol=1e-5)


def test_refinement_is_the_affinity_weighted_sum() -> None:
    g = torch.Generator().manual_seed(0)
    cams, affinity = torch.rand(2, 3, 5, generator=g), torch.rand(2, 5, 5, generator=g)
    expected = torch.zeros(2, 3, 5)
    for b in range(2):
        for k in range(3):
            for i in range(5):
                expected[b, k, i] = sum(affinity[b, i, j] * cams[b, k, j] for j in range(5))
    torch.testing.assert_close(refine_with_affinity(cams, affinity), expected)


def test_config_and_tag_shape_errors() -> None:
    model = _model(variant="v1")
    with pytest.raises(ConfigError, match="cams.blocks"):
        class_activation_maps(model, torch.rand(1, 3, 16, 16), torch.ones(1, 4), CAMConfig(blocks=9))
    with pytest.raises(ConfigError, match="cams.scales"):
        class_activation_maps(model, torch.rand(1, 3, 16, 16), torch.ones(1, 4), CAMConfig(scales=[0.0]))
    with pytest.raises(ValueError, match="tags must be"):
        class_activation_maps(model, torch.rand(1, 3, 16, 16), torch.ones(1, 3))
