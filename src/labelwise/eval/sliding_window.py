"""Sliding-window inference with blended overlapping windows, for images larger than the model's
input (aerial tiles up to 6000x6000).

Windows of size ``(wh, ww)`` are placed every ``stride = floor(size * (1 - overlap))`` pixels
(at least 1) along each axis, plus one last window flush with the bottom/right border, so the
image is covered exactly. Windows are cut out lazily and run through the model
``batch_windows`` at a time; the logits of each window are multiplied by a blend weight map and
accumulated, and the sum is divided by the accumulated weights. An image smaller than the
window is zero-padded at the bottom/right and the result cropped back.

Inference only: runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from labelwise.data.wide_context import context_margin, context_of_windows
from labelwise.errors import ConfigError

__all__ = ["sliding_window_logits", "predict_logits", "window_starts", "blend_weights"]

ModelFn = Callable[[Tensor], Any]
BLENDS = ("gaussian", "uniform")
GAUSSIAN_SIGMA_SCALE = 0.125  # sigma = size / 8 per axis (as nnU-Net)
MIN_BLEND_WEIGHT = 1e-3  # floor of the Gaussian (its peak is 1), keeps border pixels well defined


def _pair(window: int | tuple[int, int]) -> tuple[int, int]:
    size = (window, window) if isinstance(window, int) else tuple(window)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ConfigError(f"window must be a positive int or (height, width); got {window!r}")
    return int(size[0]), int(size[1])


def window_starts(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``size`` covering ``[0, length)`` (``length >= size``), the
    last one flush with the end."""
    stride = max(1, int(size * (1.0 - overlap)))
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def blend_weights(size: tuple[int, int], blend: str, device: torch.device | None = None) -> Tensor:
    """float32 ``[h, w]`` weight map of one window: ones (``"uniform"``) or a separable
    Gaussian centred on the window, peak 1, floored at ``MIN_BLEND_WEIGHT`` (``"gaussian"``)."""
    if blend == "uniform":
        return torch.ones(size, dtype=torch.float32, device=device)
    axes = []
    for length in size:
        coords = torch.arange(length, dtype=torch.float32, device=device) + 0.5 - length / 2.0
        sigma = max(GAUSSIAN_SIGMA_SCALE * length, 1e-3)
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weights = axes[0][:, None] * axes[1][None, :]
    return (weights / weights.max()).clamp_min(MIN_BLEND_WEIGHT)


def _as_logits(output: Any) -> Tensor:
    """Accept a tensor or an object with ``.logits`` (e.g. a model's structured output)."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    raise TypeError(f"model_fn must return a logits tensor [N, C, H, W]; got {type(output).__name__}")


def _check_output(logits: Tensor, expected: tuple[int, ...]) -> Tensor:
    if tuple(logits.shape) != expected:
        raise ValueError(
            f"model_fn returned logits of shape {tuple(logits.shape)}; expected [N, C, H, W] = {expected} "
            "(the model must return one score per class at the input resolution)"
        )
    return logits.float()


def _check_image(image: Tensor) -> None:
    if image.dim() != 4:
        raise ValueError(f"image must be [B, 3, H, W]; got shape {tuple(image.shape)}")


def _check_options(overlap: float, batch_windows: int, blend: str) -> None:
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1); got {overlap}")
    if batch_windows < 1:
        raise ConfigError(f"batch_windows must be >= 1; got {batch_windows}")
    if blend not in BLENDS:
        raise ConfigError(f"blend must be one of {BLENDS}; got {blend!r}")


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def sliding_window_logits(
    model_fn: ModelFn,
    image: Tensor,
    num_classes: int,
    window: int | tuple[int, int],
    overlap: float = 0.5,
    batch_windows: int = 8,
    blend: str = "gaussian",
    context_scale: float | None = None,
) -> Tensor:
    """Blended sliding-window logits.

    Args:
        model_fn: maps ``[N, 3, wh, ww]`` to logits ``[N, num_classes, wh, ww]``.
        image: ``[B, 3, H, W]``.
        num_classes: C.
        window: window size, int or ``(wh, ww)``.
        overlap: fraction of the window shared by neighbouring windows, in [0, 1).
        batch_windows: windows per ``model_fn`` call (windows of all B images are pooled).
        blend: ``"gaussian"`` (centre of each window weighs most) or ``"uniform"`` (plain mean).
        context_scale: for wide-context models: each window goes to ``model_fn`` with its context
            (the region ``context_scale`` times larger around it, zero beyond the image, resized
            to the window; :mod:`labelwise.data.wide_context`) as ``[N, 6, wh, ww]``.

    Returns:
        float32 ``[B, C, H, W]`` on the device of ``image``.
    """
    _check_image(image)
    _check_options(overlap, batch_windows, blend)
    wh, ww = _pair(window)
    batch, _, height, width = image.shape
    padded = torch.nn.functional.pad(image, (0, max(ww - width, 0), 0, max(wh - height, 0)))
    ph, pw = padded.shape[-2:]

    positions = [
        (b, y, x)
        for y in window_starts(ph, wh, overlap)
        for x in window_starts(pw, ww, overlap)
        for b in range(batch)
    ]
    weights = blend_weights((wh, ww), blend, device=image.device)
    logits_sum = torch.zeros(batch, num_classes, ph, pw, dtype=torch.float32, device=image.device)
    weight_sum = torch.zeros(batch, 1, ph, pw, dtype=torch.float32, device=image.device)

    if context_scale is not None:
        margin = context_margin((wh, ww), context_scale)
        around = torch.nn.functional.pad(padded, (margin[1], margin[1], margin[0], margin[0]))
    for chunk in _chunks(positions, batch_windows):
        crops = torch.stack([padded[b, :, y : y + wh, x : x + ww] for b, y, x in chunk])
        if context_scale is not None:
            crops = torch.cat([crops, context_of_windows(around, chunk, (wh, ww), context_scale, margin)], dim=1)
        out = _check_output(_as_logits(model_fn(crops)), (len(chunk), num_classes, wh, ww))
        out = out * weights
        for (b, y, x), window_logits in zip(chunk, out):
            logits_sum[b, :, y : y + wh, x : x + ww] += window_logits
            weight_sum[b, :, y : y + wh, x : x + ww] += weights

    return (logits_sum / weight_sum)[:, :, :height, :width]


@torch.no_grad()
def predict_logits(
    model_fn: ModelFn,
    image: Tensor,
    num_classes: int,
    window: int | tuple[int, int] | None = None,
    overlap: float = 0.5,
    batch_windows: int = 8,
    blend: str = "gaussian",
    context_scale: float | None = None,
) -> Tensor:
    """float32 logits ``[B, C, H, W]`` of ``image`` ``[B, 3, H, W]``.

    Calls ``model_fn(image)`` directly (no padding) when ``window`` is None or the image fits
    in one window (``H <= wh`` and ``W <= ww``); otherwise :func:`sliding_window_logits`. A
    wide-context model (``context_scale``) always goes through the windows, which give it
    contexts (one window of the image's size when ``window`` is None).
    """
    _check_image(image)
    batch, _, height, width = image.shape
    if context_scale is not None:
        size = _pair(window) if window is not None else (height, width)
        return sliding_window_logits(model_fn, image, num_classes, size, overlap, batch_windows, blend, context_scale)
    if window is not None:
        wh, ww = _pair(window)
        if height > wh or width > ww:
            return sliding_window_logits(model_fn, image, num_classes, (wh, ww), overlap, batch_windows, blend)
    return _check_output(_as_logits(model_fn(image)), (batch, num_classes, height, width))
