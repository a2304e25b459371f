"""PriMaPs-style principal mask proposals and their EM prototype fit (Hahn et al., "Boosting
Unsupervised Semantic Segmentation with Principal Mask Proposals", TMLR 2024).

Mask proposals (:func:`principal_mask_proposals`), per image on the frozen patch features
``[B, D, h, w]``: take the first principal direction of the features not yet explained by a
mask, anchor at the patch that is most aligned with it, and claim every unexplained patch whose
cosine similarity to the anchor reaches a threshold; repeat on what is left until the masks cover
enough of the image. Each proposal is meant to be one semantically coherent region.

Global class prototypes ``[K, D]`` are fitted to the proposals by EM:

* E-step: each patch's nearest prototype by cosine similarity (:func:`nearest_prototype`); each
  proposal then takes the majority prototype of its patches as the pseudo-label of all of them
  (:func:`mask_majority_labels`).
* M-step: each prototype moves towards the mean unit feature of the patches pseudo-labelled with
  it, with momentum (:func:`em_prototype_update`; to accumulate over many batches first, use
  :func:`em_prototype_sums` and :func:`prototypes_from_sums`).

Where this differs from the paper: the paper's M-step trains a cosine classifier with a focal
loss by SGD and keeps an EMA copy of it; ours is the closed-form mean with momentum (no gradient
steps, so one update can be checked by hand). The paper also refines proposals with a CRF and
smooths pseudo-labels with a median filter; here the proposals stay on the patch grid, without
either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "em_prototype_sums",
    "em_prototype_update",
    "mask_majority_labels",
    "nearest_prototype",
    "principal_mask_proposals",
    "prototypes_from_sums",
]

# A set of remaining features counts as having no variance when its largest principal variance
# is at most this fraction of its summed squared norms. Float32 round-off of identical features
# stays around 1e-14; features that differ by less than ~1e-4 (relative) all have cosine ~1 to
# each other and end up in one mask whichever of them anchors it.
ZERO_VARIANCE = 1e-8


def _principal_directions(x: Tensor, remaining: Tensor) -> Tensor:
    """Unit first principal direction of the remaining rows of each image.

    Args:
        x: ``[B, N, D]`` float32 features.
        remaining: ``[B, N]`` bool.

    Returns:
        ``[B, D]``; all zeros for an image whose remaining features have no variance
        (:data:`ZERO_VARIANCE`), including one or no remaining patch.

    The eigen-decomposition runs on the smaller of the Gram matrix ``Xc Xc^T [B, N, N]`` and the
    scatter matrix ``Xc^T Xc [B, D, D]`` of the masked, centred features ``Xc`` (zero rows for
    patches not remaining): both have the same non-zero eigenvalues, and a Gram eigenvector
    ``u`` maps to the principal direction ``Xc^T u``. Eigenvector signs are arbitrary; callers
    use the direction only through absolute cosines.
    """
    # float64: LAPACK's float32 eigh fails to converge on some masked Gram matrices (many zero
    # rows, near-repeated eigenvalues), seen on real ViT features
    x = x.double()
    mask = remaining[..., None].to(x.dtype)
    count = mask.sum(1).clamp(min=1)
    centred = (x - (x * mask).sum(1, keepdim=True) / count[:, None]) * mask
    num_patches, dim = x.shape[1:]
    if num_patches < dim:
        values, vectors = torch.linalg.eigh(centred @ centred.transpose(1, 2))
        direction = F.normalize(torch.einsum("bnd,bn->bd", centred, vectors[..., -1]), dim=1)
    else:
        values, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)
        direction = vectors[..., -1]
    has_variance = values[:, -1] > ZERO_VARIANCE * (x * x * mask).sum((1, 2))
    return (direction * has_variance[:, None]).float()


def _anchor_patches(unit: Tensor, direction: Tensor, remaining: Tensor) -> Tensor:
    """``[B]`` index of the remaining patch with the largest absolute cosine between its unit
    feature (``unit [B, N, D]``) and ``direction [B, D]`` (first index on ties, so the first
    remaining patch when the direction is zero)."""
    alignment = torch.einsum("bnd,bd->bn", unit, direction).abs()
    return torch.where(remaining, alignment, torch.full_like(alignment, -1.0)).argmax(1)


@torch.no_grad()
def principal_mask_proposals(features: Tensor, threshold: float, *, valid: Tensor | None = None,
                             coverage: float = 0.95, max_masks: int = 16) -> Tensor:
    """Per-image principal mask proposals on a patch grid.

    Per image, with ``remaining`` = the valid patches no proposal has claimed yet, and while the
    claimed fraction of the valid patches (``claimed / valid``, in float64) is below
    ``coverage``, fewer than ``max_masks`` proposals were found and ``remaining`` is not empty:

    1. ``v`` = the first principal direction of the remaining features, centred by their own mean
       (the first right-singular vector of the centred matrix);
    2. the anchor = the remaining patch whose unit feature has the largest absolute cosine with
       ``v`` (absolute, because the sign of ``v`` is arbitrary; ties: lowest flat index ``y * w +
       x``). Remaining features without variance (one patch, or all identical) have no
       principal direction: the anchor is then the first remaining patch;
    3. the new proposal = the remaining patches whose unit feature has cosine similarity
       ``>= threshold`` to the anchor's (the anchor always belongs to it);
    4. its patches get the proposal's index (0, 1, 2, ... in the order found) and leave
       ``remaining``.

    All images advance together, one proposal per round (at most ``max_masks`` rounds); an image
    that has stopped takes no further proposals.

    Args:
        features: ``[B, D, h, w]``, any float dtype (computed in float32).
        threshold: cosine similarity to the anchor that a patch needs to join its proposal.
        valid: ``[B, h, w]`` bool, the patches to partition (None: all).
        coverage: stop an image once this fraction of its valid patches is claimed.
        max_masks: at most this many proposals per image.

    Returns:
        ``[B, h, w]`` int64: the index of the proposal that claimed each patch; -1 for patches no
        proposal claimed and for invalid patches.
    """
    if features.dim() != 4:
        raise ValueError(f"expected features [B, D, h, w], got {tuple(features.shape)}")
    batch, _, h, w = features.shape
    device = features.device
    if valid is None:
        valid = torch.ones(batch, h, w, dtype=torch.bool, device=device)
    elif tuple(valid.shape) != (batch, h, w):
        raise ValueError(f"expected valid [B, h, w] = {(batch, h, w)}, got {tuple(valid.shape)}")
    if max_masks < 0:
        raise ValueError(f"max_masks must be >= 0, got {max_masks}")
    with torch.autocast(device.type, enabled=False):
        x = features.detach().float().flatten(2).transpose(1, 2)  # [B, N, D]
        unit = F.normalize(x, dim=2)
        remaining = valid.to(device=device, dtype=torch.bool).reshape(batch, -1).clone()
        num_valid = remaining.sum(1).double().clamp(min=1)
        claimed = torch.zeros(batch, dtype=torch.float64, device=device)
        proposals = torch.full((batch, h * w), -1, dtype=torch.int64, device=device)
        images = torch.arange(batch, device=device)
        for index in range(max_masks):
            active = remaining.any(1) & (claimed / num_valid < coverage)
            if not bool(active.any()):
                break
            anchor = _anchor_patches(unit, _principal_directions(x, remaining), remaining)
            similarity = torch.einsum("bnd,bd->bn", unit, unit[images, anchor])
            joins = remaining & (similarity >= threshold)
            joins[images, anchor] = True
            joins &= active[:, None]
            proposals[joins] = index
            remaining &= ~joins
            claimed += joins.sum(1)
    return proposals.reshape(batch, h, w)


@torch.no_grad()
def mask_majority_labels(proposals: Tensor, cluster_ids: Tensor, num_clusters: int, *,
                         num_masks: int | None = None) -> Tensor:
    """Give every patch of a proposal the most frequent cluster id among the proposal's patches.

    Args:
        proposals: ``[B, h, w]`` int64 proposal index per patch, -1 = unclaimed
            (:func:`principal_mask_proposals`).
        cluster_ids: ``[B, h, w]`` int64 in ``[0, num_clusters)`` wherever ``proposals >= 0``
            (other patches are ignored).
        num_masks: an upper bound on the proposal indices + 1 (default: read from
            ``proposals``, one device sync).

    Returns:
        ``[B, h, w]`` int64: the majority cluster id of each patch's proposal (ties: the
        smallest id); -1 where ``proposals`` is -1.
    """
    if proposals.dim() != 3 or tuple(cluster_ids.shape) != tuple(proposals.shape):
        raise ValueError(f"expected proposals and cluster_ids [B, h, w]; "
                         f"got {tuple(proposals.shape)} and {tuple(cluster_ids.shape)}")
    batch = proposals.shape[0]
    masks = proposals.reshape(batch, -1).long()
    ids = cluster_ids.reshape(batch, -1).to(masks.device).long()
    claimed = masks >= 0
    if bool(((ids < 0) | (ids >= num_clusters))[claimed].any()):
        raise ValueError(f"cluster_ids of claimed patches must lie in [0, {num_clusters})")
    if num_masks is None:
        num_masks = int(masks.max()) + 1 if masks.numel() else 0
    if num_masks <= 0:
        return torch.full_like(masks, -1).reshape(proposals.shape)
    slot = torch.where(claimed, masks * num_clusters + ids, torch.zeros_like(masks))
    counts = torch.zeros(batch, num_masks * num_clusters, dtype=torch.int64, device=masks.device)
    counts.scatter_add_(1, slot, claimed.long())
    majority = counts.view(batch, num_masks, num_clusters).argmax(2)  # [B, M]; first max = smallest id
    labels = majority.gather(1, masks.clamp(min=0))
    return torch.where(claimed, labels, torch.full_like(labels, -1)).reshape(proposals.shape)


@torch.no_grad()
def nearest_prototype(features: Tensor, prototypes: Tensor) -> Tensor:
    """``[N]`` int64: index of the prototype (``[K, D]``) with the highest cosine similarity to
    each row of ``features [N, D]`` (first index on ties). Float32."""
    if features.dim() != 2 or prototypes.dim() != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"expected features [N, D] and prototypes [K, D]; "
                         f"got {tuple(features.shape)} and {tuple(prototypes.shape)}")
    with torch.autocast(features.device.type, enabled=False):
        unit = F.normalize(features.detach().float(), dim=1)
        centres = F.normalize(prototypes.detach().to(device=unit.device, dtype=torch.float32), dim=1)
        return (unit @ centres.T).argmax(1)


@torch.no_grad()
def em_prototype_sums(features: Tensor, labels: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums of unit features and patch counts, the sufficient statistics of the
    M-step; add them up over batches, then call :func:`prototypes_from_sums`.

    Args:
        features: ``[N, D]`` (normalised to unit rows here; a zero row counts but adds nothing).
        labels: ``[N]`` int64 pseudo-label in ``[0, num_clusters)``, -1 = ignored.

    Returns:
        ``(sums [K, D] float32, counts [K] int64)``.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"expected features [N, D] and labels [N]; "
                         f"got {tuple(features.shape)} and {tuple(labels.shape)}")
    labels = labels.to(features.device).long()
    if bool(((labels < -1) | (labels >= num_clusters)).any()):
        raise ValueError(f"labels must be -1 or lie in [0, {num_clusters})")
    keep = labels >= 0
    index = labels.clamp(min=0)
    unit = F.normalize(features.detach().float(), dim=1) * keep[:, None]
    sums = torch.zeros(num_clusters, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, index, unit)
    counts = torch.zeros(num_clusters, dtype=torch.int64, device=features.device)
    counts.index_add_(0, index, keep.long())
    return sums, counts


@torch.no_grad()
def prototypes_from_sums(sums: Tensor, counts: Tensor, prototypes: Tensor, momentum: float) -> Tensor:
    """M-step from accumulated statistics (:func:`em_prototype_sums`).

    For every cluster ``k`` with ``counts[k] > 0``: ``mean_k = normalize(sums[k] / counts[k])``
    and ``p_k <- normalize(momentum * p_k + (1 - momentum) * mean_k)``; a cluster without
    patches keeps its prototype.

    Args:
        sums: ``[K, D]``; counts: ``[K]``; prototypes: ``[K, D]`` unit rows.
        momentum: in ``[0, 1]``; 0 jumps to the mean, 1 keeps the prototypes.

    Returns:
        New ``[K, D]`` float32 prototypes on ``sums``' device (the inputs are not modified).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    if sums.dim() != 2 or tuple(prototypes.shape) != tuple(sums.shape) or tuple(counts.shape) != sums.shape[:1]:
        raise ValueError(f"expected sums [K, D], counts [K] and prototypes [K, D]; got {tuple(sums.shape)}, "
                         f"{tuple(counts.shape)} and {tuple(prototypes.shape)}")
    old = prototypes.detach().to(device=sums.device, dtype=torch.float32)
    counts = counts.to(sums.device)
    mean = F.normalize(sums.float() / counts.clamp(min=1).float()[:, None], dim=1)
    moved = F.normalize(momentum * old + (1.0 - momentum) * mean, dim=1)
    return torch.where((counts > 0)[:, None], moved, old)


def em_prototype_update(features: Tensor, labels: Tensor, prototypes: Tensor, momentum: float) -> Tensor:
    """One M-step on one batch: :func:`em_prototype_sums` then :func:`prototypes_from_sums`.

    Args:
        features: ``[N, D]``.
        labels: ``[N]`` int64 pseudo-labels, -1 = ignored.
        prototypes: ``[K, D]`` unit rows.

    Returns:
        New ``[K, D]`` float32 prototypes.
    """
    sums, counts = em_prototype_sums(features, labels, prototypes.shape[0])
    return prototypes_from_sums(sums, counts, prototypes, momentum)
