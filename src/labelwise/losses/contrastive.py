"""Contrastive pretraining losses: MoCo-style InfoNCE, global and dense (DenseCL).

* :func:`info_nce`: InfoNCE of queries against their positive keys, with negatives from a
  memory queue or, when no queue is given, the other keys of the batch.
* :class:`FeatureQueue`: MoCo's FIFO queue of momentum-encoder keys (buffers, so it is saved in
  checkpoints and ``--resume`` continues with the same negatives).
* :class:`ProjectionMLP` / :class:`DenseProjection`: the global (pooled vector) and dense
  (per location, 1x1 convolutions) projection heads.
* :func:`view_correspondence` + :func:`dense_info_nce`: the dense term. Positives are matched
  by their **known geometric correspondence**: every feature-map cell of view A is mapped
  through the two crop boxes (and flips) to the point of view B showing the same image
  location, and the key map of view B is sampled there bilinearly; cells that fall outside view
  B are dropped. DenseCL instead matches by feature similarity (argmax over B's cells), which
  needs no boxes but is noisy while the features are still poor, i.e. during exactly the short
  training a CPU budget allows; the boxes are free here because multi-crop records them.

The choice of negatives: a queue (``queue_size > 0``, MoCo v2) gives thousands of negatives at
the cost of one matrix product, independent of the batch size, which matters on a CPU where
batches are small (32-64); in-batch negatives (``queue_size = 0``, SimCLR / MoCo v3 style)
need no state but only ``2B - 1`` negatives per query. The dense queue holds one vector per
image (the mean of its normalised key map, as DenseCL).

All losses run in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def info_nce(query: Tensor, key: Tensor, negatives: Tensor | None = None, temperature: float = 0.2) -> Tensor:
    """InfoNCE: mean over rows of ``-log(exp(q.k+ / t) / (exp(q.k+ / t) + sum_n exp(q.n / t)))``.

    Args:
        query: ``[N, D]`` queries (L2-normalised here).
        key: ``[N, D]`` positive keys, row ``i`` for query ``i`` (normalised here; no gradient
            flows into them when they come from a momentum encoder, detach before calling).
        negatives: ``[M, D]`` negative keys (a queue; normalised here), or ``None`` for in-batch
            negatives: query ``i`` against every key ``j != i``.
        temperature: the softmax temperature ``t``.
    """
    if query.dim() != 2 or query.shape != key.shape:
        raise ValueError(f"info_nce expects query and key [N, D], got {tuple(query.shape)} and {tuple(key.shape)}")
    with torch.autocast(query.device.type, enabled=False):
        q = F.normalize(query.float(), dim=1)
        k = F.normalize(key.float(), dim=1)
        if negatives is None:
            logits = q @ k.t() / temperature  # [N, N], the positive on the diagonal
            labels = torch.arange(q.shape[0], device=q.device)
        else:
            n = F.normalize(negatives.float(), dim=1)
            positive = (q * k).sum(1, keepdim=True)
            logits = torch.cat([positive, q @ n.t()], dim=1) / temperature  # [N, 1 + M]
            labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


def _gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` of every rank along dim 0 (``x`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class FeatureQueue(nn.Module):
    """A FIFO queue of ``size`` normalised ``dim``-vectors (MoCo's negatives).

    ``queue`` ``[size, dim]`` starts as random unit vectors; :meth:`push` writes new keys (of
    every rank under DDP, so ranks keep identical queues) over the oldest ones.
    """

    queue: Tensor
    pointer: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: Tensor) -> None:
        """Enqueue ``keys [N, dim]`` (normalised here), replacing the oldest entries."""
        keys = F.normalize(_gather(keys.detach().float()), dim=1)
        size = self.queue.shape[0]
        keys = keys[-size:]
        start = int(self.pointer)
        rows = (torch.arange(keys.shape[0], device=keys.device) + start) % size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.pointer.fill_((start + keys.shape[0]) % size)


class ProjectionMLP(nn.Module):
    """MoCo v2 projection ``[N, in_dim] -> Linear -> ReLU -> Linear -> [N, out_dim]``."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DenseProjection(nn.Module):
    """DenseCL's dense projection ``[B, in_dim, h, w] -> 1x1 conv -> ReLU -> 1x1 conv -> [B, out_dim, h, w]``."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden_dim, out_dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def view_correspondence(boxes_a: Tensor, flips_a: Tensor, boxes_b: Tensor, flips_b: Tensor, height: int, width: int
                        ) -> tuple[Tensor, Tensor]:
    """Where each cell of view A's ``height x width`` feature map lies in view B.

    Args:
        boxes_a, boxes_b: ``[B, 4]`` crop boxes ``(x0, y0, x1, y1)`` of the two views, as
            fractions of the source image.
        flips_a, flips_b: bool ``[B]``, whether each view was mirrored after cropping.

    Returns:
        ``grid [B, h * w, 2]``: the ``(x, y)`` position in view B of each cell centre of view A
        (row-major), in ``grid_sample`` coordinates (-1 / +1 = the outer edges,
        ``align_corners=False``); ``valid`` bool ``[B, h * w]``: the position is inside view B.
    """
    device = boxes_a.device
    u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    uu, vv = uu.reshape(1, -1), vv.reshape(1, -1)  # [1, h*w] crop-relative cell centres of view A
    uu = torch.where(flips_a.view(-1, 1), 1.0 - uu, uu)
    x0a, y0a, x1a, y1a = boxes_a.float().unbind(1)
    xs = x0a[:, None] + uu * (x1a - x0a)[:, None]  # [B, h*w] source-image fractions
    ys = y0a[:, None] + vv * (y1a - y0a)[:, None]
    x0b, y0b, x1b, y1b = boxes_b.float().unbind(1)
    ub = (xs - x0b[:, None]) / (x1b - x0b)[:, None]
    vb = (ys - y0b[:, None]) / (y1b - y0b)[:, None]
    ub = torch.where(flips_b.view(-1, 1), 1.0 - ub, ub)
    valid = (ub >= 0) & (ub <= 1) & (vb >= 0) & (vb <= 1)
    grid = torch.stack([ub * 2 - 1, vb * 2 - 1], dim=-1)
    return grid, valid


def sample_at(feature_map: Tensor, grid: Tensor) -> Tensor:
    """Bilinearly sample ``feature_map [B, D, h, w]`` at ``grid [B, P, 2]`` -> ``[B, P, D]``."""
    sampled = F.grid_sample(feature_map.float(), grid.unsqueeze(2).float(), mode="bilinear",
                            padding_mode="border", align_corners=False)  # [B, D, P, 1]
    return sampled.squeeze(-1).transpose(1, 2)


def dense_info_nce(query_map: Tensor, key_map: Tensor, grid: Tensor, valid: Tensor,
                   negatives: Tensor | None = None, temperature: float = 0.2) -> Tensor:
    """Dense InfoNCE: each valid cell of ``query_map [B, D, h, w]`` (view A) against the key of
    view B at its corresponding position (``grid``, ``valid`` from :func:`view_correspondence`)
    sampled from ``key_map [B, D, h', w']``; negatives from ``negatives [M, D]`` or, when None,
    the matched keys of every other cell of the batch. Zero (still connected to the graph) when
    no cell is valid."""
    queries = query_map.flatten(2).transpose(1, 2)  # [B, h*w, D]
    with torch.autocast(query_map.device.type, enabled=False):
        keys = sample_at(F.normalize(key_map.float(), dim=1), grid)  # [B, h*w, D]
    q, k = queries[valid], keys[valid]
    if q.shape[0] == 0:
        return query_map.sum() * 0.0
    return info_nce(q, k, negatives, temperature)


def mean_key(key_map: Tensor) -> Tensor:
    """One vector per image for the dense queue: the mean of the normalised ``key_map
    [B, D, h, w]`` over locations, ``[B, D]``."""
    return F.normalize(key_map.float(), dim=1).mean((2, 3))
