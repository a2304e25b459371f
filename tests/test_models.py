"""Shapes, registry, configs, input checks and gradients of the segmentation models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from labelwise.errors import ConfigError
from labelwise.models import (
    DeepSupervisionOutput,
    SegmentationModel,
    U2Net,
    UNet,
    available_models,
    create,
    register_model,
)
from labelwise.models import base as models_base
from labelwise.models.blocks import (
    ChannelShuffle,
    ConvBNReLU,
    DoubleConv,
    GroupedShuffleBlock,
    channel_shuffle,
    fit_groups,
)
from labelwise.models.u2net import RSU

SIZES = [(2, 37, 53), (1, 64, 64), (1, 33, 97)]


def _images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("block", ["conv", "shuffle"])
def test_unet_shapes_any_size(depth: int, block: str) -> None:
    model = UNet(num_classes=4, depth=depth, width=8, block=block).eval()
    assert model.output_stride == 2**depth
    with torch.no_grad():
        for batch, height, width in SIZES:
            assert model(_images(batch, height, width)).shape == (batch, 4, height, width)


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_unet_reflect_padding_and_upsampling(upsample: str) -> None:
    model = UNet(3, depth=4, width=8, max_width=32, padding_mode="reflect", upsample=upsample)
    model.eval()
    assert model.encoder_channels == [8, 16, 32, 32, 32]
    with torch.no_grad():
        for batch, height, width in SIZES + [(1, 5, 3), (1, 1, 1)]:
            assert model(_images(batch, height, width)).shape == (batch, 3, height, width)


@pytest.mark.parametrize("block", ["conv", "shuffle"])
def test_u2net_small_shapes_eval_and_train(block: str) -> None:
    model = create("u2net_small", num_classes=3, block=block, padding_mode="reflect")
    assert model.output_stride == 32
    model.eval()
    with torch.no_grad():
        for batch, height, width in SIZES:
            out = model(_images(batch, height, width))
            assert isinstance(out, torch.Tensor)
            assert out.shape == (batch, 3, height, width)
    model.train()
    out = model(_images(2, 37, 53))
    assert isinstance(out, DeepSupervisionOutput)
    assert out.logits.shape == (2, 3, 37, 53)
    assert len(out.side_logits) == 6
    assert all(side.shape == (2, 3, 37, 53) for side in out.side_logits)


def test_u2net_full_small_input() -> None:
    model = create("u2net", num_classes=2)
    assert model.config()["variant"] == "full"
    assert len(model.encoder.stages) == 6 and len(model.decoder) == 5
    assert [s.conv_in[0].out_channels for s in model.encoder.stages] == [64, 128, 256, 512, 512, 512]
    with torch.no_grad():
        model.eval()
        assert model(_images(1, 33, 41)).shape == (1, 2, 33, 41)
        model.train()
        out = model(_images(2, 32, 32))
    assert out.logits.shape == (2, 2, 32, 32) and len(out.side_logits) == 6


def test_u2net_fused_output_starts_as_mean_of_sides() -> None:
    model = create("u2net_small", num_classes=3).train()
    with torch.no_grad():
        out = model(_images(1, 40, 40))
    torch.testing.assert_close(out.logits, torch.stack(out.side_logits).mean(0))


@pytest.mark.parametrize("height", [7, 6, 5, 4])
@pytest.mark.parametrize("dilated", [False, True])
def test_rsu_any_size(height: int, dilated: bool) -> None:
    block = RSU(height, 5, 4, 6, dilated=dilated).eval()
    for size in [(1, 1), (13, 7), (33, 50)]:
        assert block(torch.randn(1, 5, *size)).shape == (1, 6, *size)


@pytest.mark.parametrize(
    "name, options",
    [
        ("unet", dict(depth=3, width=8, max_width=16, block="shuffle", groups=2,
                      upsample="transpose", padding_mode="reflect", dropout=0.1)),
        ("u2net_small", dict(block="shuffle", dropout=0.2)),
        ("u2net", dict(variant="small", groups=2, block="shuffle")),
    ],
)
def test_config_round_trip(name: str, options: dict) -> None:
    model = create(name, num_classes=7, **options)
    config = json.loads(json.dumps(model.config()))
    assert config["num_classes"] == 7
    rebuilt = create(**config)
    assert type(rebuilt) is type(model)
    assert rebuilt.config() == config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())  # strict


def test_normalisation_buffers_not_in_state_dict() -> None:
    model = UNet(2, depth=2, width=4)
    assert not any("pixel_" in key for key in model.state_dict())
    assert model.pixel_mean.shape == (1, 3, 1, 1)


def test_registry_errors_name_the_culprit() -> None:
    assert {"unet", "u2net", "u2net_small"} <= set(available_models())
    with pytest.raises(ConfigError, match="'unetz'.*u2net.*unet"):
        create("unetz", num_classes=2)
    with pytest.raises(ConfigError, match="'widht'.*'unet'"):
        create("unet", num_classes=2, widht=8)
    with pytest.raises(ConfigError, match="'u2net_small'.*'variant'"):
        create("u2net_small", num_classes=2, variant="full")
    with pytest.raises(ConfigError, match="'block'"):
        create("unet", num_classes=2, block="resnet")
    with pytest.raises(ConfigError, match="'num_classes'"):
        create("unet", num_classes=0)


def test_register_model_adds_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_base, "_REGISTRY", dict(models_base._REGISTRY))

    @register_model("tiny_test_model")
    class Tiny(UNet):
        pass

    model = create("tiny_test_model", num_classes=2, depth=1, width=4)
    assert isinstance(model, Tiny) and model.config()["name"] == "tiny_test_model"
    assert "tiny_test_model" in available_models()


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(3, 32, 32), r"expected images \[B, 3, H, W\].*got shape \(3, 32, 32\)"),
        (torch.rand(1, 4, 32, 32), r"got shape \(1, 4, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "got dtype torch.uint8"),
    ],
)
def test_bad_input_raises_value_error(bad: torch.Tensor, message: str) -> None:
    for model in (UNet(2, depth=2, width=4), create("u2net_small", num_classes=2)):
        with pytest.raises(ValueError, match=message):
            model(bad)


@pytest.mark.parametrize("channels, groups", [(12, 3), (12, 4), (8, 2), (6, 1), (10, 5)])
def test_channel_shuffle_matches_index_arithmetic(channels: int, groups: int) -> None:
    x = torch.randn(2, channels, 3, 4)
    per_group = channels // groups
    # output channel j = i * groups + k holds channel i of group k, i.e. input k * per_group + i
    perm = [(j % groups) * per_group + j // groups for j in range(channels)]
    torch.testing.assert_close(channel_shuffle(x, groups), x[:, perm])
    torch.testing.assert_close(ChannelShuffle(groups)(x), x[:, perm])


def test_channel_shuffle_rejects_indivisible_channels() -> None:
    with pytest.raises(ValueError, match="10 channels"):
        channel_shuffle(torch.randn(1, 10, 2, 2), 4)


def test_shuffle_block_group_fallback() -> None:
    assert fit_groups(4, 3, 32) == 1 and fit_groups(4, 12, 18) == 3 and fit_groups(4, 8, 16) == 4
    block = GroupedShuffleBlock(3, 10, groups=4)  # neither 3 nor 10 divisible by 4
    assert block.reduce.conv.groups == 1 and block.expand.conv.groups == 2
    assert block(torch.randn(1, 3, 9, 9)).shape == (1, 10, 9, 9)
    same = GroupedShuffleBlock(16, 16, groups=4, kernel_size=3, dilation=2)
    assert same.residual and same.reduce.conv.groups == 4
    assert same.depthwise.conv.groups == 16 and same.depthwise.conv.dilation == (2, 2)
    assert same(torch.randn(1, 16, 5, 6)).shape == (1, 16, 5, 6)


def test_convs_before_batchnorm_have_no_bias() -> None:
    models = [
        UNet(2, depth=2, width=8, block="conv"),
        UNet(2, depth=2, width=8, block="shuffle"),
        create("u2net_small", num_classes=2, block="shuffle"),
    ]
    checked = 0
    for model in models:
        for module in model.modules():
            if isinstance(module, ConvBNReLU):
                assert module.conv.bias is None
                assert isinstance(module.bn, nn.BatchNorm2d)
                checked += 1
    assert checked > 20
    assert isinstance(DoubleConv(3, 8)[0], ConvBNReLU)


@pytest.mark.parametrize(
    "model",
    [
        lambda: UNet(3, depth=3, width=8, dropout=0.1),
        lambda: UNet(3, depth=2, width=8, block="shuffle", upsample="transpose"),
        lambda: create("u2net_small", num_classes=3, dropout=0.1),
    ],
)
def test_gradient_reaches_every_parameter(model) -> None:
    model = model().train()
    out = model(_images(2, 37, 53))
    if isinstance(out, DeepSupervisionOutput):
        loss = out.logits.sum() + sum(side.sum() for side in out.side_logits)
    else:
        loss = out.sum()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_encoder_split_and_feature_perturbation() -> None:
    model = UNet(3, depth=3, width=8).eval()
    encoder_ids = {id(p) for p in model.encoder_parameters()}
    decoder_ids = {id(p) for p in model.decoder_parameters()}
    assert encoder_ids and decoder_ids and not encoder_ids & decoder_ids
    assert len(encoder_ids) + len(decoder_ids) == len(list(model.parameters()))
    images = _images(2, 37, 53)
    with torch.no_grad():
        features = model.encode(images)
        assert [f.shape[1] for f in features] == model.encoder_channels
        assert features[0].shape[-2:] == (40, 56)  # padded to output_stride 8
        dropped = [nn.functional.dropout2d(f, 0.5, training=True) for f in features]
        assert model.decode(dropped, size=images.shape[-2:]).shape == (2, 3, 37, 53)
        torch.testing.assert_close(model.decode(features, size=(37, 53)), model(images))


@pytest.mark.parametrize(
    "model",
    [lambda: UNet(3, depth=3, width=8), lambda: create("u2net_small", num_classes=3)],
)
def test_bf16_autocast_forward(model) -> None:
    model: SegmentationModel = model().eval()
    images = _images(2, 37, 53)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.shape == (2, 3, 37, 53) and torch.isfinite(out.float()).all()
    with torch.no_grad():
        reference = model(images)
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.1


def test_u2net_is_registered_with_variants() -> None:
    assert isinstance(create("u2net", num_classes=2, variant="small"), U2Net)
    assert create("u2net_small", num_classes=2).config()["variant"] == "small"
