"""Rotation prediction (Gidaris et al., 2018): rotate images by 0, 90, 180 or 270 degrees and
train a 4-way classifier on pooled features to tell which.

Usable on its own (the ``rotation`` pretraining method) or as an auxiliary term of another
objective: :func:`rotation_loss` takes pooled features and the rotation ids, nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_ROTATIONS = 4


def rotate_images(images: Tensor, rotation_ids: Tensor) -> Tensor:
    """Rotate image ``i`` of ``images [B, C, S, S]`` (square) counter-clockwise by
    ``90 * rotation_ids[i]`` degrees (ids in 0..3); returns ``[B, C, S, S]``."""
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotate_images expects square images [B, C, S, S], got {tuple(images.shape)}")
    if rotation_ids.shape != images.shape[:1]:
        raise ValueError(f"rotation_ids must be [B] = [{images.shape[0]}], got {tuple(rotation_ids.shape)}")
    out = images.clone()
    for k in range(1, NUM_ROTATIONS):
        chosen = (rotation_ids == k).nonzero().squeeze(1)
        if chosen.numel():
            out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    return out


def random_rotations(images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Rotate each image of ``images [B, C, S, S]`` by a uniformly drawn multiple of 90 degrees;
    returns ``(rotated [B, C, S, S], rotation_ids long [B])``."""
    ids = torch.randint(0, NUM_ROTATIONS, (images.shape[0],), generator=generator).to(images.device)
    return rotate_images(images, ids), ids


class RotationHead(nn.Module):
    """``[N, in_dim] -> [N, 4]`` rotation logits: a linear layer, or an MLP with one hidden
    layer of ``hidden_dim`` (ReLU) when ``hidden_dim > 0``."""

    def __init__(self, in_dim: int, hidden_dim: int = 0) -> None:
        super().__init__()
        if hidden_dim > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                                nn.Linear(hidden_dim, NUM_ROTATIONS))
        else:
            self.net = nn.Linear(in_dim, NUM_ROTATIONS)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def rotation_loss(head: nn.Module, features: Tensor, rotation_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy of ``head(features [N, D])`` against ``rotation_ids [N]`` (0..3).

    Returns ``(loss, accuracy)``: the float32 scalar loss and the detached fraction of rotations
    predicted correctly.
    """
    logits = head(features).float()
    loss = F.cross_entropy(logits, rotation_ids)
    accuracy = (logits.detach().argmax(1) == rotation_ids).float().mean()
    return loss, accuracy
