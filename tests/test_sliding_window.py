"""Sliding-window inference: exactness, coverage, shapes and batching."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from labelwise.errors import ConfigError
from labelwise.eval import predict_logits, sliding_window_logits
from labelwise.eval.sliding_window import window_starts

NUM_CLASSES = 5


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 3, padding=1)
    ).eval()


def pointwise_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 1)).eval()


class CallCounter:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.model(x)


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
def test_window_covering_image_equals_direct_call(blend: str) -> None:
    model = conv_net()
    image = torch.rand(2, 3, 24, 31)
    with torch.no_grad():
        direct = model(image)
    out = sliding_window_logits(model, image, NUM_CLASSES, window=(24, 31), blend=blend)
    assert out.dtype == torch.float32 and out.shape == direct.shape
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)
    for window in (None, (24, 31), 40):  # fits in one window: called directly, no padding
        torch.testing.assert_close(predict_logits(model, image, NUM_CLASSES, window=window), direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_pointwise_model_sliding_equals_direct(blend: str, overlap: float) -> None:
    model = pointwise_net()
    image = torch.rand(2, 3, 37, 53)
    with torch.no_grad():
        direct = model(image)
    out = sliding_window_logits(model, image, NUM_CLASSES, window=16, overlap=overlap, blend=blend)
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)
    out = predict_logits(model, image, NUM_CLASSES, window=(12, 20), overlap=overlap, blend=blend)
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(10, 7), (33, 50), (16, 41), (5, 100)])
def test_output_shape_odd_and_small_images(size: tuple[int, int]) -> None:
    model = pointwise_net()
    image = torch.rand(1, 3, *size)
    out = sliding_window_logits(model, image, NUM_CLASSES, window=(16, 24), overlap=0.5)
    assert out.shape == (1, NUM_CLASSES, *size)
    with torch.no_grad():
        torch.testing.assert_close(out, model(image), atol=1e-5, rtol=1e-5)


def reference_uniform(model: nn.Module, image: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Per-pixel mean of the outputs of every window covering it (image >= window)."""
    _, _, height, width = image.shape

    def starts(length: int) -> list[int]:
        s = list(range(0, length - window + 1, stride))
        return s if s[-1] == length - window else s + [length - window]

    total = torch.zeros(image.shape[0], NUM_CLASSES, height, width)
    count = torch.zeros(1, 1, height, width)
    with torch.no_grad():
        for y in starts(height):
            for x in starts(width):
                total[:, :, y : y + window, x : x + window] += model(image[:, :, y : y + window, x : x + window])
                count[:, :, y : y + window, x : x + window] += 1
    return total / count


def test_uniform_blend_is_mean_of_covering_windows_and_gaussian_is_convex() -> None:
    model = conv_net()  # zero padding: windows disagree near their borders
    image = torch.rand(2, 3, 30, 45)
    ref = reference_uniform(model, image, window=16, stride=8)
    out = sliding_window_logits(model, image, NUM_CLASSES, window=16, overlap=0.5, blend="uniform")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(out, model(image), atol=1e-3)

    # Gaussian blending is a per-pixel convex combination of the covering windows' outputs
    lo = torch.full_like(ref, math.inf)
    hi = torch.full_like(ref, -math.inf)
    with torch.no_grad():
        for y in window_starts(30, 16, 0.5):
            for x in window_starts(45, 16, 0.5):
                win = model(image[:, :, y : y + 16, x : x + 16])
                lo[:, :, y : y + 16, x : x + 16] = torch.minimum(lo[:, :, y : y + 16, x : x + 16], win)
                hi[:, :, y : y + 16, x : x + 16] = torch.maximum(hi[:, :, y : y + 16, x : x + 16], win)
    gauss = sliding_window_logits(model, image, NUM_CLASSES, window=16, overlap=0.5, blend="gaussian")
    assert (gauss >= lo - 1e-5).all() and (gauss <= hi + 1e-5).all()
    assert not torch.allclose(gauss, out, atol=1e-4)


def test_window_starts_cover_with_last_flush() -> None:
    for length in range(16, 70):
        for overlap in (0.0, 0.3, 0.5, 0.9):
            starts = window_starts(length, 16, overlap)
            assert starts[0] == 0 and starts[-1] == length - 16
            assert all(b > a for a, b in zip(starts, starts[1:]))
            assert all(b - a <= 16 for a, b in zip(starts, starts[1:]))  # no gaps


def test_windows_are_batched() -> None:
    counter = CallCounter(pointwise_net())
    image = torch.rand(2, 3, 40, 40)  # window 16, stride 8: 4 x 4 positions x 2 images = 32 windows
    sliding_window_logits(counter, image, NUM_CLASSES, window=16, overlap=0.5, batch_windows=8)
    assert counter.batch_sizes == [8, 8, 8, 8]
    counter.batch_sizes.clear()
    sliding_window_logits(counter, image, NUM_CLASSES, window=16, overlap=0.5, batch_windows=5)
    assert len(counter.batch_sizes) == math.ceil(32 / 5) and sum(counter.batch_sizes) == 32
    assert max(counter.batch_sizes) == 5


def test_bad_options_and_outputs() -> None:
    model = pointwise_net()
    image = torch.rand(1, 3, 20, 20)
    with pytest.raises(ConfigError, match="overlap"):
        sliding_window_logits(model, image, NUM_CLASSES, window=8, overlap=1.0)
    with pytest.raises(ConfigError, match="blend"):
        sliding_window_logits(model, image, NUM_CLASSES, window=8, blend="cosine")
    with pytest.raises(ValueError, match="shape"):
        sliding_window_logits(model, image, NUM_CLASSES + 1, window=8)
