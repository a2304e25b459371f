"""Any backbone for unsupervised segmentation (CNN and joined features), HP's affinity local
positives and collapse guard, and ``method: primaps`` end to end; against literal computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelwise.config import load_config
from labelwise.errors import ConfigError
from labelwise.features.attention import affinity_local_weights
from labelwise.methods import unsupervised
from labelwise.methods.unsupervised.model import UnsupervisedHead
from labelwise.methods.unsupervised.train import guarded_lambda, normalized_size_entropy
from labelwise.models.artifact import load_artifact
from labelwise.models.feature_backbones import (
    CNNFeatures,
    ColorHistogramFeatures,
    ConcatFeatures,
    feature_backbone_config,
    feature_backbone_from_config,
    load_feature_backbone,
)
from labelwise.models.vit import VisionTransformer, ViTConfig


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(patch_size=16, embed_dim=24, depth=1, num_heads=2, pos_grid=4)).eval()


def _cnn() -> CNNFeatures:
    torch.manual_seed(1)
    return CNNFeatures(None, ("stage4", "stage5")).eval()


def test_cnn_features_cover_the_image_padded_to_the_stride() -> None:
    cnn = _cnn()
    out = cnn(torch.rand(2, 3, 50, 70))
    assert out.shape == (2, 96 + 1280, math.ceil(50 / 16), math.ceil(70 / 16))
    assert cnn.embed_dim == 96 + 1280


def test_concat_features_are_the_normalised_parts_joined() -> None:
    vit, cnn = _tiny_vit(), _cnn()
    joined = ConcatFeatures([vit, cnn]).eval()
    images = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        out = joined(images)
        first = vit(images).patch_tokens.float()
        second = cnn(images).float()
    assert first.shape[-2:] == second.shape[-2:]
    expected = torch.cat([first / first.norm(dim=1, keepdim=True), second / second.norm(dim=1, keepdim=True)],
                         dim=1) / math.sqrt(2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, *out.shape[-2:]), rtol=1e-5, atol=1e-5)


def test_backbone_config_rebuilds_the_same_network() -> None:
    joined = ConcatFeatures([_tiny_vit(), _cnn()]).eval()
    rebuilt = feature_backbone_from_config(feature_backbone_config(joined))
    rebuilt.load_state_dict(joined.state_dict())
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), joined(images))


def _textbook_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] -> CIE L*a*b* (D65) from the published formulas."""
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    to_xyz = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                       [0.019334, 0.119193, 0.950227]])
    xyz = linear @ to_xyz.T / np.array([0.950456, 1.0, 1.088754])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def _literal_color_histogram(image: np.ndarray, size: int, l_bins: int, ab_bins: int, ab_range: float) -> np.ndarray:
    """Per-patch sqrt of the soft Lab histogram, by loops over patches and pixels."""
    height, width = image.shape[:2]
    rows, cols = -(-height // size), -(-width // size)
    padded = np.pad(image, ((0, rows * size - height), (0, cols * size - width), (0, 0)), mode="edge")
    lab = _textbook_lab(padded)
    l_centres = np.linspace(0, 100, l_bins)
    ab_centres = np.linspace(-ab_range, ab_range, ab_bins)
    out = np.zeros((l_bins, ab_bins, ab_bins, rows, cols))
    for r in range(rows):
        for c in range(cols):
            for y in range(r * size, (r + 1) * size):
                for x in range(c * size, (c + 1) * size):
                    lightness, a_star, b_star = lab[y, x]
                    wl = [max(0.0, 1 - abs(np.clip(lightness, 0, 100) - v) / (100 / (l_bins - 1))) for v in l_centres]
                    step = 2 * ab_range / (ab_bins - 1)
                    wa = [max(0.0, 1 - abs(np.clip(a_star, -ab_range, ab_range) - v) / step) for v in ab_centres]
                    wb = [max(0.0, 1 - abs(np.clip(b_star, -ab_range, ab_range) - v) / step) for v in ab_centres]
                    out[:, :, :, r, c] += np.einsum("i,j,k->ijk", wl, wa, wb)
    return np.sqrt(out.reshape(l_bins * ab_bins * ab_bins, rows, cols) / size ** 2)


def test_color_histogram_matches_a_literal_per_patch_loop() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((10, 13, 3))
    image[:4, :4] = [0.1, 0.6, 0.2]  # one flat patch: a single colour's memberships
    module = ColorHistogramFeatures(patch_size=4, lightness_bins=3, ab_bins=4, ab_range=50.0)
    out = module(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    expected = _literal_color_histogram(image, 4, 3, 4, 50.0)
    assert out.shape == (1, 3 * 4 * 4, 3, 4)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=2e-3)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1, 3, 4), rtol=1e-4, atol=1e-4)
    rebuilt = feature_backbone_from_config(feature_backbone_config(module))
    torch.testing.assert_close(rebuilt(torch.from_numpy(image).permute(2, 0, 1)[None].float()), out)
    joined = load_feature_backbone("color_histogram+color_histogram")
    assert joined.embed_dim == 250 and joined.patch_size == 16


def test_backbone_spec_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="stage9"):
        CNNFeatures(None, ("stage9",))
    with pytest.raises(ConfigError, match="empty part"):
        load_feature_backbone("labelwise_default+")
    with pytest.raises(ConfigError, match="CNN weights names only"):
        load_feature_backbone("labelwise_default@stage5")
    with pytest.raises(ConfigError, match="color_histogram needs"):
        ColorHistogramFeatures(lightness_bins=1)


def _literal_affinity_weights(features: torch.Tensor) -> torch.Tensor:
    b, d, h, w = features.shape
    out = torch.zeros(b, 9, h, w, dtype=torch.float64)
    for n in range(b):
        vectors = [features[n, :, i // w, i % w].double() for i in range(h * w)]
        for i in range(h * w):
            row = torch.tensor([float(vectors[i] @ v / (vectors[i].norm() * v.norm())) for v in vectors],
                               dtype=torch.float64)
            low, high = torch.quantile(row, 0.1), torch.quantile(row, 0.9)
            processed = torch.softmax(row.clamp(float(low), float(high)), 0) * math.sqrt(h * w)
            processed = torch.where(processed < processed.mean(), torch.zeros_like(processed), processed)
            y, x = divmod(i, w)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        out[n, 3 * (dy + 1) + dx + 1, y, x] = processed[(y + dy) * w + x + dx]
    return out


def test_affinity_local_weights_match_a_literal_computation_with_zero_borders() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 3, 4, generator=g)
    weights = affinity_local_weights(features)
    torch.testing.assert_close(weights.double(), _literal_affinity_weights(features), rtol=1e-5, atol=1e-6)
    # every neighbour outside the grid weighs 0: top row has no dy=-1, left column no dx=-1 ...
    assert weights[:, 0:3, 0, :].abs().sum() == 0 and weights[:, 6:9, -1, :].abs().sum() == 0
    assert weights[:, [0, 3, 6], :, 0].abs().sum() == 0 and weights[:, [2, 5, 8], :, -1].abs().sum() == 0
    # a patch is always at least as alike to itself as the average patch: the centre weight is kept
    assert (weights[:, 4] > 0).all()


def test_normalized_size_entropy_matches_the_formula() -> None:
    assignments = torch.tensor([0, 0, 0, 1, 2, 2])
    p = np.array([3, 1, 2]) / 6
    assert normalized_size_entropy(assignments, 4) == pytest.approx(float(-(p * np.log(p)).sum() / np.log(4)))
    assert normalized_size_entropy(torch.zeros(10, dtype=torch.long), 5) == 0.0
    assert normalized_size_entropy(torch.arange(6), 6) == pytest.approx(1.0)


def test_collapse_guard_holds_lambda_once_the_entropy_drops() -> None:
    head = UnsupervisedHead("hp", 4, 3, pool_size=2)
    assert guarded_lambda(head, 0.0, 0.9, 0.8) == 0.0  # warm-up: the reference follows the monitor
    assert guarded_lambda(head, 0.0, 0.8, 0.8) == 0.0
    assert float(head.collapse_state[0]) == pytest.approx(0.8)
    assert guarded_lambda(head, 0.2, 0.7, 0.8) == 0.2  # 0.7 >= 0.8 * 0.8: no hold
    assert guarded_lambda(head, 0.3, None, 0.8) == 0.3  # between renewals
    assert guarded_lambda(head, 0.4, 0.6, 0.8) == 0.4  # 0.6 < 0.64: held at 0.4 from now on
    assert guarded_lambda(head, 0.9, 0.9, 0.8) == 0.4
    assert guarded_lambda(head, 1.0, None, 0.8) == 0.4
    unguarded = UnsupervisedHead("hp", 4, 3, pool_size=2)
    assert guarded_lambda(unguarded, 0.0, 0.9, None) == 0.0
    assert guarded_lambda(unguarded, 0.7, 0.1, None) == 0.7


def _synthetic(tmp_path, method: str, backbone: str, *extra: str) -> unsupervised.UnsupervisedConfig:  # noqa: ANN001
    return load_config(unsupervised.UnsupervisedConfig, None, [
        "data.dataset=synthetic", "data.synthetic_train_images=12", "data.synthetic_val_images=4",
        "data.synthetic_size=[64, 64]", f"method={method}", f"features.backbone={backbone}",
        "features.crop_mode=whole", "features.crop_size=64", "features.batch_size=6", "batch_size=6",
        f"features.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / method}", "progress=false",
        "eval.linear_probe=false", "stages.0.steps=3", "hp.dim=16", "hp.pool_size=12", "hp.renew_every=1",
        "hp.lambda_warmup_steps=1", "checkpoint_every=100", *extra])


def test_hp_on_a_cnn_takes_local_weights_from_affinity_and_attention_is_refused(tmp_path) -> None:  # noqa: ANN001
    config = _synthetic(tmp_path, "hp", "mobilenet_v2_imagenet", "hp.collapse_guard=0.9",
                        "hp.specific_positives=agreeing")
    result = unsupervised.train(config)
    assert result.train is not None and result.train.steps == 3
    scores = unsupervised.probe(result.run_dir)
    assert 0.0 < scores["miou"] <= 1.0
    refused = _synthetic(tmp_path, "hp", "mobilenet_v2_imagenet", "hp.local_weights=attention",
                         f"run_dir={tmp_path / 'refused'}")
    with pytest.raises(ConfigError, match="hp.local_weights"):
        unsupervised.train(refused)


def test_primaps_run_exports_a_centred_model_that_predicts_its_prototypes(tmp_path) -> None:  # noqa: ANN001
    config = _synthetic(tmp_path, "primaps", "labelwise_default+mobilenet_v2_imagenet", "primaps.em_epochs=2",
                        "primaps.batch_size=4")
    result = unsupervised.train(config)
    record = result.summary["primaps"]
    assert record["centred"] and 0 < record["claimed_fraction"] <= 1 and -1 < record["threshold"] < 1
    artifact = load_artifact(result.run_dir)
    segmenter = artifact.module
    assert artifact.kind == "clusters" and segmenter.feature_center is not None
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = segmenter.backbone(images).float()
        codes = F.normalize(features - segmenter.feature_center, dim=1)
        expected = torch.einsum("bchw,kc->bkhw", codes, segmenter.centroids)
        expected = F.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(segmenter(images), expected, rtol=1e-4, atol=1e-5)
    assert 0.0 < unsupervised.probe(result.run_dir)["miou"] <= 1.0
