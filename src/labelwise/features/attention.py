"""Reductions of ViT attention maps ``[B, heads, N, N]`` to what a feature cache stores
(``cls``, ``patch``, ``neighbourhood``; shapes in :mod:`labelwise.features.cache`), and the
patch tokens of a backbone's output."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from labelwise.errors import ConfigError

__all__ = ["ATTENTION_KINDS", "affinity_local_weights", "local_positive_weights", "neighbourhood_attention",
           "patch_tokens", "reduce_attention",
           "row_quantile"]

ATTENTION_KINDS = ("cls", "patch", "neighbourhood", "local_positive")


def neighbourhood_attention(patch_attention: Tensor, grid: Sequence[int], radius: int = 1) -> Tensor:
    """Weights of each patch to its ``(2r+1)^2`` neighbours.

    Args:
        patch_attention: ``[B, h*w, h*w]`` patch -> patch weights (rows: querying patch).
        grid: ``(h, w)``.

    Returns:
        ``[B, (2r+1)^2, h, w]``; channel ``(2r+1) * (dy + r) + (dx + r)`` holds the weight of patch
        ``(y, x)`` to ``(y + dy, x + dx)``, 0 where that neighbour is outside the grid.
    """
    h, w = int(grid[0]), int(grid[1])
    batch = patch_attention.shape[0]
    rows = patch_attention.reshape(batch, h, w, h * w)
    ys = torch.arange(h, device=patch_attention.device)
    xs = torch.arange(w, device=patch_attention.device)
    out = patch_attention.new_zeros(batch, (2 * radius + 1) ** 2, h, w)
    channel = 0
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ny, nx = ys + dy, xs + dx
            valid = ((ny >= 0) & (ny < h))[:, None] & ((nx >= 0) & (nx < w))[None, :]
            target = ny.clamp(0, h - 1)[:, None] * w + nx.clamp(0, w - 1)[None, :]  # [h, w]
            gathered = torch.gather(rows, 3, target.expand(batch, h, w)[..., None])[..., 0]
            out[:, channel] = gathered * valid
            channel += 1
    return out


def row_quantile(x: Tensor, q: float) -> Tensor:
    """Quantile ``q`` of each row of ``x [..., n]`` with linear interpolation (``torch.quantile``'s
    default), via one sort: ``torch.quantile`` refuses inputs above 16M elements.

    Returns ``[..., 1]``.
    """
    ordered = x.sort(dim=-1).values
    position = q * (x.shape[-1] - 1)
    low = int(position)
    high = min(low + 1, x.shape[-1] - 1)
    fraction = position - low
    return ordered[..., low:low + 1] * (1 - fraction) + ordered[..., high:high + 1] * fraction


def local_positive_weights(patch_attention: Tensor, grid: Sequence[int], scale: float | None = None,
                           low: float = 0.1, high: float = 0.9) -> Tensor:
    """Neighbour weights of HP's local hidden positives from head-averaged patch attention.

    Each row (one querying patch) is clipped to its ``[low, high]`` quantiles, soft-maxed over
    all patches, multiplied by ``scale`` (default ``sqrt(h * w)``: 28 at the paper's 28x28 grid,
    the reference code's constant) and zeroed below its mean; then the 3x3 neighbourhood is
    taken (:func:`neighbourhood_attention`).

    Args:
        patch_attention: ``[B, h*w, h*w]`` (class token and registers removed).
        grid: ``(h, w)``.

    Returns:
        ``[B, 9, h, w]`` non-negative weights, 0 outside the grid.
    """
    h, w = int(grid[0]), int(grid[1])
    rows = patch_attention.float()
    rows = torch.maximum(torch.minimum(rows, row_quantile(rows, high)), row_quantile(rows, low))
    rows = rows.softmax(dim=-1) * (math.sqrt(h * w) if scale is None else scale)
    rows = rows * (rows >= rows.mean(dim=-1, keepdim=True))
    return neighbourhood_attention(rows, (h, w))


def affinity_local_weights(features: Tensor, scale: float | None = None) -> Tensor:
    """HP's local-positive neighbour weights for a backbone without attention (a CNN, joined
    features): :func:`local_positive_weights` applied to the patch affinity ``cos(f_i, f_j)`` in
    place of the head-averaged attention.

    The rule keeps what the attention rule does: each row is clipped to its 10% / 90% quantiles,
    soft-maxed over all patches of the image and scaled by ``sqrt(h * w)`` (so an average patch
    weighs about 1), then zeroed below its mean, so a neighbour counts as a local positive only
    when it is more alike than the image's average patch; neighbours outside the grid weigh 0.

    Args:
        features: ``[B, D, h, w]`` backbone features.
        scale: as in :func:`local_positive_weights`.

    Returns:
        ``[B, 9, h, w]`` non-negative weights in the ``"neighbourhood"`` layout.
    """
    b, _, h, w = features.shape
    unit = torch.nn.functional.normalize(features.float().flatten(2), dim=1)  # [B, D, h*w]
    affinity = torch.bmm(unit.transpose(1, 2), unit)  # [B, h*w, h*w]
    return local_positive_weights(affinity, (h, w), scale)


def reduce_attention(weights: Tensor, kind: str, prefix: int, grid: tuple[int, int]) -> Tensor:
    h, w = grid
    weights = weights.float()
    if kind == "cls":
        return weights[:, :, 0, prefix:].reshape(weights.shape[0], weights.shape[1], h, w)
    patch = weights[:, :, prefix:, prefix:].mean(1)
    if kind == "patch":
        return patch
    if kind == "neighbourhood":
        return neighbourhood_attention(patch, grid)
    if kind == "local_positive":
        return local_positive_weights(patch, grid)
    raise ConfigError(f"attention_kinds: unknown kind {kind!r} (valid: {list(ATTENTION_KINDS)})")


def patch_tokens(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        features = output
    elif hasattr(output, "patch_tokens"):
        features = output.patch_tokens
    elif isinstance(output, (list, tuple)) and output and isinstance(output[-1], Tensor):
        features = output[-1]
    else:
        raise ConfigError(f"backbone returned {type(output).__name__}; expected patch_tokens [B, D, h, w]")
    if features.dim() != 4:
        raise ConfigError(f"backbone features must be [B, D, h, w], got shape {tuple(features.shape)}")
    return features
