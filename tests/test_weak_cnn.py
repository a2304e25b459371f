"""CNN CAMs, the pretrained-CNN hybrid stem and pixel-adaptive refinement, each against an
independent literal computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelwise.errors import ConfigError
from labelwise.eval.pixel_adaptive import PixelAdaptiveConfig, pixel_adaptive_refine
from labelwise.methods.weak.cams import CAMConfig, class_activation_maps
from labelwise.models.cnn_cam import CNNCAMClassifier, cam_loss
from labelwise.models.encoders import build_encoder
from labelwise.models.mctformer import MultiClassTokenViT, PretrainedCNNStem
from labelwise.models.vit import VisionTransformer, ViTConfig


def _hand_built_classifier() -> CNNCAMClassifier:
    torch.manual_seed(0)
    model = CNNCAMClassifier(3, weights=None).eval()
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn_like(model.classifier.weight))
        model.classifier.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    return model


def test_cnn_cam_is_the_literal_weighted_sum_of_the_last_stage() -> None:
    model = _hand_built_classifier()
    images = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        out = model(images)
        features = model.encoder((images - model.pixel_mean) / model.pixel_std)[-1].double().numpy()
    weight = model.classifier.weight.detach().double().numpy()[:, :, 0, 0]  # [K, C]
    b, c, h, w = features.shape
    assert (h, w) == (math.ceil(40 / 16), math.ceil(56 / 16))
    literal = np.zeros((b, 3, h, w))
    for n in range(b):
        for k in range(3):
            for y in range(h):
                for x in range(w):
                    literal[n, k, y, x] = sum(weight[k, i] * features[n, i, y, x] for i in range(c))
    np.testing.assert_allclose(out.patch_cams.double().numpy(), literal, rtol=1e-4, atol=1e-4)
    # the logit is the pooled classifier: mean of the maps plus the bias
    np.testing.assert_allclose(out.scores.numpy(), literal.mean((2, 3)) + [0.5, -1.0, 2.0], rtol=1e-4, atol=1e-4)


def test_cnn_class_activation_maps_keep_tagged_classes_normalised() -> None:
    model = _hand_built_classifier()
    images = torch.rand(2, 3, 48, 64)
    tags = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    cams = class_activation_maps(model, images, tags, CAMConfig(scales=[1.0, 0.5], flip=True))
    assert cams.shape == (2, 3, 48, 64)
    assert float(cams[~tags].abs().max()) == 0.0
    peaks = cams.flatten(2).amax(2)[tags]
    assert torch.all((peaks == 1) | (peaks == 0))
    assert float(cams.min()) >= 0


def test_cam_loss_is_the_multilabel_soft_margin_of_the_scores() -> None:
    model = _hand_built_classifier()
    out = model(torch.rand(2, 3, 32, 32))
    tags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    s = out.scores.detach().double()
    literal = -(tags * torch.log(torch.sigmoid(s)) + (1 - tags) * torch.log(1 - torch.sigmoid(s))).mean(1).mean()
    assert float(cam_loss(out, tags).detach()) == pytest.approx(float(literal), rel=1e-5)


def test_pretrained_cnn_stem_sees_the_image_in_its_own_convention() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(patch_size=16, embed_dim=24, depth=2, num_heads=2, pos_grid=4))
    stem = PretrainedCNNStem(24, 16, vit.pixel_mean.flatten().tolist(), vit.pixel_std.flatten().tolist(),
                             weights=None).eval()
    images = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        tokens = stem((images - vit.pixel_mean) / vit.pixel_std)
        encoder, convention = build_encoder("mobilenet_v2", None, output_stride=16)
        encoder.load_state_dict(stem.encoder.state_dict())
        mean = torch.tensor(convention.mean).view(1, 3, 1, 1)
        std = torch.tensor(convention.std).view(1, 3, 1, 1)
        expected = stem.proj(encoder.eval()((images - mean) / std)[-1])
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)
    model = MultiClassTokenViT(vit, 3, "v2", stem=stem).eval()
    out = model(images)
    assert out.patch_tokens.shape[-2:] == (2, 3) and out.scores.shape == (1, 3)
    new = {n for n, _ in model.named_parameters() if model.is_new_parameter(n)}
    assert "backbone.patch_embed.proj.weight" in new
    assert not any(n.startswith("backbone.patch_embed.encoder.") for n in new)
    assert model.stem_description() == {"type": "pretrained_cnn", "encoder": "mobilenet_v2", "weights": None}


def _literal_par(image: np.ndarray, maps: np.ndarray, dilations: list[int], iterations: int, w1: float,
                 w2: float, features: np.ndarray | None = None, w3: float = 0.0, temperature: float = 0.1
                 ) -> np.ndarray:
    """Pixel-adaptive refinement by loops over pixels and neighbours (borders: nearest pixel);
    ``features [D, H, W]`` at the image size add the cosine-similarity term with weight ``w3``."""
    channels, height, width = image.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    lengths = np.array([math.hypot(*o) for o in offsets])
    position = -(lengths / (lengths.std(ddof=1) * w1)) ** 2
    position_soft = np.exp(position - position.max()) / np.exp(position - position.max()).sum()

    def at(y: int, x: int) -> tuple[int, int]:
        return min(max(y, 0), height - 1), min(max(x, 0), width - 1)

    weights = np.zeros((height, width, len(offsets)))
    for y in range(height):
        for x in range(width):
            values = np.array([image[:, at(y + dy, x + dx)[0], at(y + dy, x + dx)[1]] for dy, dx in offsets])  # [N, C]
            spread = values.std(axis=0, ddof=1) + 1e-8
            colour = -((np.abs(values - image[:, y, x]) / (spread * w1)) ** 2).mean(1)
            soft = np.exp(colour - colour.max()) / np.exp(colour - colour.max()).sum()
            weights[y, x] = soft + w2 * position_soft
            if features is not None:
                here = features[:, y, x] / np.linalg.norm(features[:, y, x])
                cosine = np.array([features[:, at(y + dy, x + dx)[0], at(y + dy, x + dx)[1]] @ here
                                   / np.linalg.norm(features[:, at(y + dy, x + dx)[0], at(y + dy, x + dx)[1]])
                                   for dy, dx in offsets]) / temperature
                weights[y, x] += w3 * np.exp(cosine - cosine.max()) / np.exp(cosine - cosine.max()).sum()
            weights[y, x] /= 1 + w2 + w3
    out = maps.copy()
    for _ in range(iterations):
        new = np.zeros_like(out)
        for y in range(height):
            for x in range(width):
                for n, (dy, dx) in enumerate(offsets):
                    yy, xx = at(y + dy, x + dx)
                    new[:, y, x] += weights[y, x, n] * out[:, yy, xx]
        out = new
    return out


def test_pixel_adaptive_refinement_matches_a_literal_loop() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((3, 7, 9))
    image[:, :, :4] *= 0.2  # a dark left part: colour edges the weights must follow
    maps = rng.random((2, 7, 9))
    config = PixelAdaptiveConfig(dilations=[1, 3], iterations=2, color_scale=0.3, position_weight=0.05)
    out = pixel_adaptive_refine(torch.from_numpy(image)[None].float(), torch.from_numpy(maps)[None].float(), config)
    expected = _literal_par(image, maps, [1, 3], 2, 0.3, 0.05)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert float(out.max()) <= 1.0 + 1e-6 and float(out.min()) >= 0.0  # convex weights keep [0, 1]


def test_pixel_adaptive_feature_affinity_matches_a_literal_loop() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((3, 6, 8))
    features = rng.standard_normal((5, 6, 8))
    features[:, :, 4:] += 3.0  # two feature regions the colours do not show
    maps = rng.random((2, 6, 8))
    config = PixelAdaptiveConfig(dilations=[1, 2], iterations=2, color_scale=0.3, position_weight=0.01,
                                 feature_weight=0.7, feature_temperature=0.2)
    out = pixel_adaptive_refine(torch.from_numpy(image)[None].float(), torch.from_numpy(maps)[None].float(), config,
                                features=torch.from_numpy(features)[None].float())
    expected = _literal_par(image, maps, [1, 2], 2, 0.3, 0.01, features, 0.7, 0.2)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-4, atol=1e-5)
    # features at a coarser grid are upsampled to the image; a weight without features is an error
    coarse = pixel_adaptive_refine(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), config, torch.rand(1, 5, 2, 2))
    assert coarse.shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="feature map"):
        pixel_adaptive_refine(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), config)
    with pytest.raises(ConfigError, match="feature_weight"):
        PixelAdaptiveConfig(feature_weight=-1.0).validate()


def test_pixel_adaptive_refinement_with_no_iterations_is_the_identity() -> None:
    maps = torch.rand(1, 2, 5, 6)
    out = pixel_adaptive_refine(torch.rand(1, 3, 5, 6), maps, PixelAdaptiveConfig(iterations=0))
    torch.testing.assert_close(out, maps)
    with pytest.raises(ValueError, match="must share"):
        pixel_adaptive_refine(torch.rand(1, 3, 5, 6), torch.rand(1, 2, 4, 6))


def test_pretrained_encoder_batchnorm_stays_in_eval_mode_while_training() -> None:
    from labelwise.models.encoders import skip_pretrained_weights

    with skip_pretrained_weights():  # the pretrained layout and convention, without reading the file
        pretrained = CNNCAMClassifier(3, weights="imagenet").train()
        stem = PretrainedCNNStem(32, 16, [0.5] * 3, [0.5] * 3, weights="imagenet").train()
    for encoder in (pretrained.encoder, stem.encoder):
        norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and not any(m.training for m in norms)
    assert pretrained.classifier.training and stem.proj.training
    # a random-init encoder has no statistics to keep: its BatchNorm trains
    scratch = _hand_built_classifier().train()
    assert all(m.training for m in scratch.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("method", ["cnn_cam", "hybrid"])
def test_cnn_classifiers_train_export_and_reload(tmp_path, method: str) -> None:  # noqa: ANN001
    from labelwise.config import load_config
    from labelwise.methods.weak.config import WeakConfig
    from labelwise.methods.weak.train import load_classifier, train_classifier
    from labelwise.models import create_vit
    from labelwise.models.vit_loading import save_vit

    torch.manual_seed(0)
    vit = save_vit(create_vit("custom", 16, embed_dim=32, depth=2, num_heads=2), tmp_path / "vit.safetensors")
    config = load_config(WeakConfig, None, [
        "data.dataset=synthetic", "data.synthetic_train_images=8", "data.synthetic_size=[32, 48]",
        f"backbone={vit}", "image_size=[32, 48]", "stages.0.steps=2", "batch_size=4", f"method={method}",
        "encoder_weights=null", f"run_dir={tmp_path / 'run'}", "device=cpu", "progress=false", "precision=fp32",
        "cams.blocks=2"])
    train_classifier(config)
    model, summary = load_classifier(tmp_path / "run")
    assert summary["type"] == method and summary["method"] == method
    images = torch.rand(2, 3, 32, 48)
    cams = class_activation_maps(model, images, torch.ones(2, model.num_classes, dtype=torch.bool),
                                 CAMConfig(blocks=2))
    assert cams.shape == (2, model.num_classes, 32, 48)
    again, _ = load_classifier(tmp_path / "run")
    torch.testing.assert_close(class_activation_maps(again, images, torch.ones(2, model.num_classes, dtype=torch.bool),
                                                     CAMConfig(blocks=2)), cams)
    # the pseudo-mask stage with feature affinity: the classifier's own features at the image size
    from labelwise.methods.weak.cams import classifier_features
    from labelwise.methods.weak.pseudo_masks import PseudoMaskConfig
    from labelwise.methods.weak.stages import make_pseudo_masks

    features = classifier_features(model, images)
    assert features.dim() == 4 and features.shape[0] == 2
    items = [{"image": images[i], "tags": torch.ones(model.num_classes), "name": f"im{i}",
              "mask": torch.zeros(32, 48, dtype=torch.long)} for i in range(2)]
    par = PixelAdaptiveConfig(dilations=[1, 2], iterations=1, feature_weight=0.5)
    report = make_pseudo_masks(tmp_path / "run", items, tmp_path / "pseudo", CAMConfig(blocks=2),
                               PseudoMaskConfig(refine="par", par=par), write_cams=False)
    assert report["images"] == 2 and "cams_refined" in report
