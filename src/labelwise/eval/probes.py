"""Linear probe: how linearly readable the frozen patch features of a backbone are.

The probe is a 1x1 convolution (no BatchNorm, no hidden layer) from the D cached feature
channels to C class logits, trained on the train split's cached features and labels and scored
on another split with the project's confusion matrix at full label resolution.

Training objective. Logits are upsampled bilinearly (``align_corners=False``) from the patch
grid to the label resolution and the loss is the cross-entropy there; labels are never pooled to
the patch grid. Because bilinear interpolation is linear and the probe is affine, the upsampled
logit of a pixel equals the probe applied to the bilinearly interpolated feature at that pixel,
so training uses interpolated features at a fixed seeded sample of ``pixels_per_image``
labeled pixels per image (all of them when None) — the same objective as full upsampling, on a
subsample. Plus ``weight_decay * |W|^2`` (L2 on the weights, not the bias), which makes the
problem strictly convex.

Optimiser and convergence. Full-batch L-BFGS (strong-Wolfe line search) on features
standardised per channel over the sampled pixels (the standardisation is folded back into the
returned weights, which apply to raw features). It stops when the largest gradient entry is
below ``tolerance`` or the loss/parameter change falls below ``tolerance_change`` (converged),
or after ``max_iter`` iterations (``converged`` is then False).

Evaluation. Logits ``W f + b`` on the patch grid, upsampled as in training to the padded image
``(h * stride, w * stride)``, cropped to ``(H, W)``, argmax, streamed into a
:class:`~labelwise.eval.metrics.ConfusionMatrix` over the whole split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from labelwise.errors import ConfigError
from labelwise.eval.kmeans import kmeans_probe, upsample_scores
from labelwise.eval.metrics import ConfusionMatrix, SegmentationMetrics
from labelwise.features.cache import FeatureCache

__all__ = ["LinearProbeResult", "bilinear_taps", "interpolate_features", "kmeans_probe", "linear_probe",
           "probe_logits"]


def bilinear_taps(out_size: int, in_size: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source taps of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis.

    Output pixel ``i`` of a resize from ``in_size`` to ``in_size * stride`` (or to ``out_size``
    when ``stride`` is None) reads ``(1 - t) * src[i0] + t * src[i1]``; returns ``(i0, i1, t)`` for
    ``i < out_size``.
    """
    resized = in_size * stride if stride else out_size
    scale = in_size / resized
    position = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(position).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (position - i0).astype(np.float32)


def interpolate_features(features: Tensor, ys: np.ndarray, xs: np.ndarray, image_size: Sequence[int],
                         stride: int | None) -> Tensor:
    """Bilinearly interpolated features ``[M, D]`` of ``features [D, h, w]`` at pixels ``(ys, xs)``
    of the label grid, exactly as ``upsample_scores`` interpolates logits."""
    _, h, w = features.shape
    y0, y1, ty = bilinear_taps(int(image_size[0]), h, stride)
    x0, x1, tx = bilinear_taps(int(image_size[1]), w, stride)
    a0, a1, wy = y0[ys], y1[ys], torch.from_numpy(ty[ys])[:, None]
    b0, b1, wx = x0[xs], x1[xs], torch.from_numpy(tx[xs])[:, None]
    flat = features.permute(1, 2, 0)  # [h, w, D]
    return ((1 - wy) * ((1 - wx) * flat[a0, b0] + wx * flat[a0, b1])
            + wy * ((1 - wx) * flat[a1, b0] + wx * flat[a1, b1]))


def probe_logits(features: Tensor, weight: Tensor, bias: Tensor, image_size: Sequence[int], stride: int | None
                 ) -> Tensor:
    """Logits ``[B, C, H, W]`` at label resolution of a 1x1 probe on ``features [B, D, h, w]``."""
    logits = torch.einsum("bdhw,cd->bchw", features, weight) + bias[None, :, None, None]
    return upsample_scores(logits, image_size, stride)


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    weight ``[C, D]`` and bias ``[C]`` apply to raw cached features (a 1x1 conv);
    ``metrics`` are those of the evaluation split.
    """

    metrics: SegmentationMetrics
    weight: Tensor
    bias: Tensor
    train_loss: float
    iterations: int
    converged: bool
    train_pixels: int
    seconds: float

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        return {**self.metrics.to_dict(class_names), "train_loss": self.train_loss, "iterations": self.iterations,
                "converged": self.converged, "train_pixels": self.train_pixels, "seconds": self.seconds}


def _num_classes(cache: FeatureCache, given: int | None) -> int:
    if given is not None:
        return given
    if cache.num_classes is not None:
        return cache.num_classes
    labels = np.asarray(cache.labels)
    return int(labels[labels != cache.ignore_index].max()) + 1


def _sample_training_pixels(cache: FeatureCache, pixels_per_image: int | None, seed: int
                            ) -> tuple[Tensor, Tensor]:
    """Interpolated features ``[M, D]`` float32 and labels ``[M]`` of the sampled labeled pixels."""
    rng = np.random.default_rng(seed)
    xs_all, ys_all = [], []
    for index in range(len(cache)):
        labels = np.asarray(cache.labels[index])  # type: ignore[index]
        valid = np.flatnonzero(labels.reshape(-1) != cache.ignore_index)
        if valid.size == 0:
            continue
        if pixels_per_image is not None and valid.size > pixels_per_image:
            valid = np.sort(rng.choice(valid, size=pixels_per_image, replace=False))
        ys, xs = np.divmod(valid, labels.shape[1])
        features = torch.from_numpy(np.asarray(cache.features[index], dtype=np.float32))
        xs_all.append(interpolate_features(features, ys, xs, cache.image_size, cache.stride))
        ys_all.append(torch.from_numpy(labels.reshape(-1)[valid].astype(np.int64)))
    if not xs_all:
        raise ConfigError(f"{cache.path}: the training cache has no labeled pixel")
    return torch.cat(xs_all), torch.cat(ys_all)


def linear_probe(train_cache: FeatureCache, val_cache: FeatureCache, *, num_classes: int | None = None,
                 pixels_per_image: int | None = 1024, weight_decay: float = 1e-4, max_iter: int = 300,
                 tolerance: float = 1e-5, tolerance_change: float = 1e-9, seed: int = 0,
                 device: str | torch.device = "cpu", batch_size: int = 8) -> LinearProbeResult:
    """Train a 1x1-conv probe on ``train_cache`` and score it on ``val_cache`` (module docstring).

    Args:
        train_cache / val_cache: feature caches with labels, same backbone (same D).
        num_classes: C (default: from the cache's class map).
        pixels_per_image: labeled pixels sampled per training image (None = all).
        weight_decay: L2 coefficient on the weights.
        max_iter / tolerance / tolerance_change: L-BFGS limits (see the module docstring).
        batch_size: images per evaluation batch.
    """
    start_time = time.perf_counter()
    for cache in (train_cache, val_cache):
        if cache.labels is None:
            raise ConfigError(f"{cache.path}: the linear probe needs labels in the feature cache")
    if train_cache.dim != val_cache.dim:
        raise ConfigError(f"{train_cache.path} has {train_cache.dim}-d features, {val_cache.path} {val_cache.dim}-d")
    num_classes = _num_classes(train_cache, num_classes)
    torch_device = torch.device(device)
    torch.manual_seed(seed)

    x, y = _sample_training_pixels(train_cache, pixels_per_image, seed)
    if int(y.max()) >= num_classes:
        raise ConfigError(f"{train_cache.path}: label {int(y.max())} >= num_classes {num_classes}")
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-6)
    z = ((x - mean) / std).to(torch_device)
    y = y.to(torch_device)
    weight = torch.zeros(num_classes, z.shape[1], device=torch_device, requires_grad=True)
    bias = torch.zeros(num_classes, device=torch_device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=tolerance_change, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + weight_decay * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[weight]
    iterations = int(state["n_iter"])
    converged = iterations < max_iter and int(state["func_evals"]) < int(max_iter * 1.25)
    with torch.no_grad():
        train_loss = float(F.cross_entropy(z @ weight.T + bias, y) + weight_decay * (weight * weight).sum())
        raw_weight = (weight / std.to(torch_device)).detach()
        raw_bias = (bias - raw_weight @ mean.to(torch_device)).detach()
    del z, x

    confusion = ConfusionMatrix(num_classes, ignore_index=val_cache.ignore_index, device=torch_device)
    with torch.no_grad():
        for start in range(0, len(val_cache), batch_size):
            features = torch.from_numpy(np.asarray(val_cache.features[start:start + batch_size], dtype=np.float32))
            logits = probe_logits(features.to(torch_device), raw_weight, raw_bias, val_cache.image_size,
                                  val_cache.stride)
            labels = torch.from_numpy(np.asarray(val_cache.labels[start:start + batch_size], dtype=np.int64))  # type: ignore[index]
            confusion.update(logits.argmax(1), labels.to(torch_device))
    return LinearProbeResult(confusion.compute(), raw_weight.cpu(), raw_bias.cpu(), train_loss, iterations,
                             converged, int(y.shape[0]), time.perf_counter() - start_time)
