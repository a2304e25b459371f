"""MobileNetV2 encoder: torchvision-layout weights, both input conventions against a literal
reference forward, strict loading errors, named weights, feature strides, output stride."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labelwise.errors import CheckpointError, ConfigError
from labelwise.models import MobileNetV2, create, skip_pretrained_weights
from labelwise.models.encoders import build_encoder
from labelwise.models.pretrained import WEIGHTS_ENV, load_strict, read_weights

# (t, c, n, s) of the paper, written out again here so the reference does not read the module's table
SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def random_torchvision_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-layout MobileNetV2 state dict with random weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    state = MobileNetV2().state_dict()
    for key, value in state.items():
        if key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = torch.randn_like(value) * 0.1
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
        elif key.endswith(".weight") and value.dim() == 1:
            state[key] = torch.rand_like(value) + 0.5
    return state


def tf_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's documented 'SAME' rule, in its own formulation."""
    total = max(kernel - (size % stride if size % stride else stride), 0)
    return total // 2, total - total // 2


def ref_conv_bn(x, state, prefix, stride, groups, tf, relu6=True, conv_key="0", bn_key="1"):
    weight = state[f"{prefix}.{conv_key}.weight"]
    k = weight.shape[-1]
    if tf and stride == 2:
        top, bottom = tf_pad(x.shape[-2], k, stride)
        left, right = tf_pad(x.shape[-1], k, stride)
        x = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, stride=stride, groups=groups)
    else:
        x = F.conv2d(x, weight, stride=stride, padding=k // 2, groups=groups)
    b = f"{prefix}.{bn_key}"
    x = (x - state[f"{b}.running_mean"][:, None, None]) / torch.sqrt(state[f"{b}.running_var"][:, None, None] + 1e-5)
    x = x * state[f"{b}.weight"][:, None, None] + state[f"{b}.bias"][:, None, None]
    return x.clamp(0, 6) if relu6 else x


def reference_forward(state, x, tf: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Literal MobileNetV2: the maps after features 1, 3, 6, 13, 18 and the 1,000 logits."""
    taps = {1, 3, 6, 13, 18}
    maps = []
    x = ref_conv_bn(x, state, "features.0", 2, 1, tf)
    index, channels = 1, 32
    for t, c, n, s in SETTING:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{index}.conv"
            hidden = channels * t
            y = x
            j = 0
            if t != 1:
                y = ref_conv_bn(y, state, f"{p}.{j}", 1, 1, tf)
                j += 1
            y = ref_conv_bn(y, state, f"{p}.{j}", stride, hidden, tf)
            y = ref_conv_bn(y, state, p, 1, 1, tf, relu6=False, conv_key=str(j + 1), bn_key=str(j + 2))
            x = x + y if stride == 1 and channels == c else y
            channels = c
            if index in taps:
                maps.append(x)
            index += 1
    x = ref_conv_bn(x, state, "features.18", 1, 1, tf)
    maps.append(x)
    logits = x.mean((2, 3)) @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    return maps, logits


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_torchvision_state()


@pytest.mark.parametrize("rule", ["tf_same", "symmetric"])
@pytest.mark.parametrize("size", [(64, 96), (45, 61)])
def test_classifier_matches_literal_reference(state, rule, size):
    net = MobileNetV2(padding_rule=rule).eval()
    load_strict(net, state, "test")
    x = torch.randn(2, 3, *size)
    _, expected = reference_forward(state, x, tf=rule == "tf_same")
    with torch.no_grad():
        got = net(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_tf_padding_differs_from_symmetric(state):
    x = torch.randn(1, 3, 64, 64)
    same, _ = reference_forward(state, x, tf=True)
    sym, _ = reference_forward(state, x, tf=False)
    assert not torch.allclose(same[-1], sym[-1], atol=1e-3)


@pytest.mark.parametrize("file_name,tf", [("mobilenet_v2_imagenet.pth", True), ("mobilenet_v2-b0353104.pth", False)])
def test_segmenter_applies_the_files_convention(tmp_path, state, file_name, tf):
    """Both weight conventions load through create(...) and the encoder sees the input the weights
    expect: [-1, 1] and TF padding, or ImageNet mean/std and symmetric padding."""
    path = tmp_path / file_name
    torch.save(state, path)
    model = create("unet", num_classes=3, encoder="mobilenet_v2", encoder_weights=str(path)).eval()
    images = torch.rand(2, 3, 64, 96)
    if tf:
        normalised = images * 2 - 1
    else:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        normalised = (images - mean) / std
    expected, _ = reference_forward(state, normalised, tf=tf)
    with torch.no_grad():
        got = model.encode(images)
    assert len(got) == 5
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    assert model.config()["encoder_convention"] == ("tf" if tf else "torchvision")


def test_named_weights_resolve_from_env(tmp_path, state, monkeypatch):
    torch.save(state, tmp_path / "mobilenet_v2_imagenet.pth")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    model = create("deeplabv3plus", num_classes=2, encoder_weights="imagenet")
    torch.testing.assert_close(model.encoder.features[3].conv[0][0].weight, state["features.3.conv.0.0.weight"])
    assert model.folded_batchnorm  # this file name is the TF-converted, BatchNorm-folded one


def test_missing_named_weights_say_where_to_put_them(tmp_path, monkeypatch):
    import labelwise.models.pretrained as pretrained

    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "empty"))
    monkeypatch.setenv("LABELWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "SHARED_WEIGHTS_DIR", tmp_path / "no_shared")
    monkeypatch.chdir(tmp_path)

    def offline(url, target, timeout=60.0):
        raise OSError("network is unreachable")

    monkeypatch.setattr("labelwise.models.vit_loading.download", offline)
    with pytest.raises(CheckpointError, match=r"mobilenet_v2_imagenet\.pth is not in any of .*empty"):
        create("unet", num_classes=2, encoder="mobilenet_v2", encoder_weights="imagenet")
    with pytest.raises(CheckpointError, match=r"mobilenet_v2-b0353104\.pth .*download https://download\.pytorch"):
        create("unet", num_classes=2, encoder="mobilenet_v2", encoder_weights="imagenet_torchvision")


def test_strict_loading_names_file_and_key(tmp_path, state):
    missing = dict(state)
    del missing["features.5.conv.1.1.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth: key 'features\.5\.conv\.1\.1\.running_var' is missing"):
        build_encoder("mobilenet_v2", str(tmp_path / "missing.pth"), convention="tf")
    extra = dict(state, **{"features.19.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra\.pth: unexpected key 'features\.19\.weight'"):
        build_encoder("mobilenet_v2", str(tmp_path / "extra.pth"), convention="tf")
    shaped = dict(state, **{"features.0.0.weight": torch.zeros(32, 3, 5, 5)})
    torch.save(shaped, tmp_path / "shaped.pth")
    with pytest.raises(CheckpointError, match=r"shaped\.pth: key 'features\.0\.0\.weight' has shape \(32, 3, 5, 5\)"):
        build_encoder("mobilenet_v2", str(tmp_path / "shaped.pth"), convention="tf")


def test_pickled_objects_are_refused(tmp_path):
    import datetime

    torch.save({"features.0.0.weight": datetime.date(2020, 1, 1)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: refused to load"):
        read_weights(tmp_path / "evil.pth")


def test_unknown_file_needs_a_convention(tmp_path, state):
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(ConfigError, match="encoder_convention"):
        create("unet", num_classes=2, encoder="mobilenet_v2", encoder_weights=str(tmp_path / "renamed.pth"))
    model = create("unet", num_classes=2, encoder="mobilenet_v2", encoder_weights=str(tmp_path / "renamed.pth"),
                   encoder_convention="torchvision")
    assert model.encoder.padding_rule == "symmetric"


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("size", [(97, 131), (64, 64), (33, 47)])
def test_feature_shapes_and_strides(output_stride, size):
    encoder, _ = build_encoder("mobilenet_v2", None, "tf", output_stride)
    model = create("deeplabv3plus", num_classes=4, encoder_weights=None,
                   encoder_output_stride=16 if output_stride == 32 else output_stride)
    padded = [math.ceil(s / 32) * 32 for s in size]
    with torch.no_grad():
        maps = encoder.eval()(torch.rand(1, 3, *padded))
        logits = model.eval()(torch.rand(2, 3, *size))
    expected_strides = (2, 4, 8, min(16, output_stride), output_stride)
    assert encoder.strides == expected_strides
    for feature, channels, stride in zip(maps, (16, 24, 32, 96, 1280), expected_strides):
        assert tuple(feature.shape) == (1, channels, padded[0] // stride, padded[1] // stride)
    assert tuple(logits.shape) == (2, 4, *size)


def test_dilated_encoder_keeps_the_weights_valid(state):
    """Dilation changes no parameter: the same state dict loads into every output stride."""
    for output_stride in (32, 16, 8):
        encoder, _ = build_encoder("mobilenet_v2", None, "tf", output_stride)
        load_strict(encoder, state, "test", allowed_extra=("classifier.",))


def test_unet_on_encoder_shapes_and_roundtrip():
    model = create("unet", num_classes=5, encoder="mobilenet_v2", encoder_weights=None).eval()
    logits = model(torch.rand(1, 3, 75, 101))
    assert tuple(logits.shape) == (1, 5, 75, 101)
    rebuilt = create(**model.config())
    assert type(rebuilt) is type(model)
    assert create("unet", num_classes=2).config()["name"] == "unet"  # the plain U-Net stays


def test_unet_options_of_the_other_kind_are_errors():
    with pytest.raises(ConfigError, match="option 'width' does not apply to a U-Net on encoder"):
        create("unet", num_classes=2, encoder="mobilenet_v2", encoder_weights=None, width=16)
    with pytest.raises(ConfigError, match="option 'decoder_channels' does not apply to the plain U-Net"):
        create("unet", num_classes=2, decoder_channels=[8, 8, 8, 8, 8])
    with pytest.raises(ConfigError, match="encoder_output_stride"):
        create("unet", num_classes=2, encoder="mobilenet_v2", encoder_weights=None, encoder_output_stride=16)
    with pytest.raises(ConfigError, match="'encoder' must be one of"):
        create("deeplabv3plus", num_classes=2, encoder="resnet50", encoder_weights=None)


def test_extra_input_bands_keep_the_rgb_kernels(tmp_path, state):
    path = tmp_path / "mobilenet_v2_imagenet.pth"
    torch.save(state, path)
    model = create("unet", num_classes=2, in_channels=4, encoder="mobilenet_v2", encoder_weights=str(path))
    kernel = model.encoder.features[0][0].weight
    torch.testing.assert_close(kernel[:, :3], state["features.0.0.weight"])
    torch.testing.assert_close(kernel[:, 3], state["features.0.0.weight"].mean(1))
    assert tuple(model(torch.rand(1, 4, 64, 64)).shape) == (1, 2, 64, 64)


def test_exported_model_loads_without_the_weights_file(tmp_path, state):
    from labelwise.config import EvalConfig
    from labelwise.data import SyntheticShapes
    from labelwise.models.export import export_model, load_model

    path = tmp_path / "weights" / "mobilenet_v2_imagenet.pth"
    path.parent.mkdir()
    torch.save(state, path)
    model = create("deeplabv3plus", num_classes=5, encoder_weights=str(path)).eval()
    export_model(tmp_path / "run", model, SyntheticShapes(num_images=1).class_map, EvalConfig())
    path.unlink()
    loaded = load_model(tmp_path / "run").model
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    with skip_pretrained_weights():  # reading nothing, even for a missing file
        create("deeplabv3plus", num_classes=5, encoder_weights=str(path))


@pytest.mark.parametrize("dilation", [2, 6])
def test_dilated_depthwise_weight_gradient_in_bf16_channels_last(dilation):
    """The weight gradient of a dilated depthwise conv under bf16 autocast on a channels-last map
    matches fp32 (oneDNN's bf16 kernel gets it wrong at this size; PaddedConv runs it in fp32)."""
    from labelwise.models.mobilenet_v2 import PaddedConv

    torch.manual_seed(0)
    conv = PaddedConv(256, 256, 3, dilation=dilation, groups=256)
    x = torch.randn(4, 256, 22, 30)
    grads = []
    for bf16 in (False, True):
        conv.zero_grad()
        if bf16:  # as the trainer runs it: model and batch in channels-last format
            conv.to(memory_format=torch.channels_last)
        inp = x.contiguous(memory_format=torch.channels_last) if bf16 else x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(inp)
        out.float().sum().backward()
        grads.append(conv.weight.grad.clone())
    relative = (grads[1] - grads[0]).abs().max() / grads[0].abs().max()
    assert relative < 0.02
