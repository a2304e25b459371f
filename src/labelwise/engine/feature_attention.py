"""Reductions of ViT attention maps ``[B, heads, N, N]`` to what a feature cache stores
(``cls``, ``patch``, ``neighbourhood``; shapes in :mod:`labelwise.engine.feature_cache`), and the
patch tokens of a backbone's output."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from labelwise.errors import ConfigError

__all__ = ["ATTENTION_KINDS", "neighbourhood_attention", "patch_tokens", "reduce_attention"]

ATTENTION_KINDS = ("cls", "patch", "neighbourhood")


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
