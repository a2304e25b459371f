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
    "symmetric_eigh",
]

# A set of remaining features counts as having no variance when its largest principal variance
# is at most this fraction of its summed squared norms. Float32 round-off of identical features
# stays around 1e-14; features that differ by less than ~1e-4 (relative) all have cosine ~1 to
# each other and end up in one mask whichever of them anchors it.
ZERO_VARIANCE = 1e-8


def symmetric_eigh(matrices: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of symmetric ``[B, n, n]`` float64 matrices (ascending eigenvalues
    ``[B, n]``, eigenvectors ``[B, n, n]``), robust to LAPACK's convergence failures.

    The batched call (LAPACK ``syevd``) fails to converge on some masked Gram matrices of real
    features (many zero rows; seen with MobileNetV2 features on CamVid, in float32 and float64).
    Then each matrix is decomposed on its own, and one that still fails goes to SciPy's
    ``evr`` driver (relatively robust representations), which converges where ``syevd`` does not.
    """
    try:
        return torch.linalg.eigh(matrices)
    except torch.linalg.LinAlgError:
        pass
    values, vectors = [], []
    for matrix in matrices:
        try:
            value, vector = torch.linalg.eigh(matrix)
        except torch.linalg.LinAlgError:
            import scipy.linalg

            value_np, vector_np = scipy.linalg.eigh(matrix.cpu().numpy(), driver="evr")
            value = torch.from_numpy(value_np).to(matrix)
            vector = torch.from_numpy(vector_np).to(matrix)
        values.append(value)
        vectors.append(vector)
    return torch.stack(values), torch.stack(vectors)


def _alignment_from_scatter(x: Tensor, unit: Tensor, remaining: Tensor) -> Tensor:
    """``[B, N]`` absolute cosine of every unit feature with the first principal direction of
    the remaining features, from the scatter matrix ``Xc^T Xc [B, D, D]`` of the masked, centred
    features (the path for ``D <= N``); 0 everywhere for an image whose remaining features have
    no variance (:data:`ZERO_VARIANCE`)."""
    x = x.double()
    mask = remaining[..., None].to(x.dtype)
    count = mask.sum(1).clamp(min=1)
    centred = (x - (x * mask).sum(1, keepdim=True) / count[:, None]) * mask
    values, vectors = symmetric_eigh(centred.transpose(1, 2) @ centred)
    has_variance = values[:, -1] > ZERO_VARIANCE * (x * x * mask).sum((1, 2))
    direction = vectors[..., -1] * has_variance[:, None]
    return torch.einsum("bnd,bd->bn", unit.double(), direction).abs()


def _alignment_from_gram(gram: Tensor, norms: Tensor, remaining: Tensor) -> Tensor:
    """The same alignment as :func:`_alignment_from_scatter` from the images' Gram matrices
    ``G = X X^T [B, N, N]`` (float64, computed once per call; the path for ``N < D``), so a
    round costs ``O(N^2)`` plus one ``N x N`` eigen-decomposition whatever ``D``.

    With ``m`` the remaining mask, ``n = sum(m)``, ``r = G m / n`` (each feature dotted with the
    remaining features' mean) and ``c = m . r / n`` (the mean's squared norm), the centred Gram
    matrix is ``Gc = (G - r 1^T - 1 r^T + c) * m m^T``; its top eigenvector ``u`` (eigenvalue
    ``lambda``) gives the principal direction ``v = Xc^T u`` with ``|v| = sqrt(lambda)``, and
    ``x_i . v = sum_j u_j m_j (G_ij - r_i)``.
    """
    mask = remaining.to(gram.dtype)
    count = mask.sum(1, keepdim=True).clamp(min=1)
    r = torch.einsum("bij,bj->bi", gram, mask) / count
    c = (mask * r).sum(1, keepdim=True) / count
    outer = mask[:, :, None] * mask[:, None, :]
    centred = (gram - r[:, :, None] - r[:, None, :] + c[:, :, None]) * outer
    values, vectors = symmetric_eigh(centred)
    top, u = values[:, -1], vectors[..., -1] * mask
    has_variance = top > ZERO_VARIANCE * (mask * torch.diagonal(gram, dim1=1, dim2=2)).sum(1)
    projection = torch.einsum("bij,bj->bi", gram, u) - r * u.sum(1, keepdim=True)
    alignment = projection.abs() / (norms * top.clamp(min=1e-300).sqrt()[:, None]).clamp(min=1e-300)
    return alignment * has_variance[:, None]


def _anchor_patches(alignment: Tensor, remaining: Tensor) -> Tensor:
    """``[B]`` index of the remaining patch with the largest ``alignment [B, N]`` (first index on
    ties, so the first remaining patch when the alignment is all 0)."""
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
        use_gram = x.shape[1] < x.shape[2]
        gram = torch.bmm(x, x.transpose(1, 2)).double() if use_gram else None  # [B, N, N]
        norms = x.norm(dim=2).double()
        cosines = torch.bmm(unit, unit.transpose(1, 2))  # [B, N, N]
        remaining = valid.to(device=device, dtype=torch.bool).reshape(batch, -1).clone()
        num_valid = remaining.sum(1).double().clamp(min=1)
        claimed = torch.zeros(batch, dtype=torch.float64, device=device)
        proposals = torch.full((batch, h * w), -1, dtype=torch.int64, device=device)
        images = torch.arange(batch, device=device)
        for index in range(max_masks):
            active = remaining.any(1) & (claimed / num_valid < coverage)
            if not bool(active.any()):
                break
            alignment = (_alignment_from_gram(gram, norms, remaining) if gram is not None
                         else _alignment_from_scatter(x, unit, remaining))
            anchor = _anchor_patches(alignment, remaining)
            similarity = cosines[images, :, anchor]
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
