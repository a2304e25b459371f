"""STEGO's correspondence-distillation loss (Hamilton et al., ICLR 2022), the baseline of HP.

Inputs are frozen backbone features ``f [B, D, h, w]`` and the trained head's codes
``c [B, C, h', w']`` of the same images (the two grids may differ: everything is addressed by
normalised coordinates). Notation for one term, with ``a`` the "anchor" image and ``b`` the
partner image:

* Sampling. ``S = feature_samples``; every image draws ``S x S`` anchor points ``u`` and ``S x S``
  partner points ``v``, uniform in ``[-1, 1]^2`` (``x`` = width, ``y`` = height). Features and
  codes are read there by bilinear interpolation (``grid_sample``, border padding,
  ``align_corners=True``: ``-1`` and ``1`` are the centres of the edge cells).
* Correlations of L2-normalised channels: ``F_pq = f_a(u_p) . f_b(v_q)`` (no gradient) and
  ``K_pq = c_a(u_p) . c_b(v_q)``, both ``[B, S, S, S, S]`` over the batch.
* Pointwise centring (``pointwise=True``): ``F <- F - mean_q F_pq + mean(F)``: every anchor
  point's row is centred, then the mean of the whole term's tensor (over the batch) is added
  back.
* Term: ``-clamp(K, lo, hi) * (F - shift)`` averaged over all entries of the batch, with
  ``lo = 0`` when ``zero_clamp`` (else unbounded) and ``hi = 0.8`` when ``stabilize`` (else
  unbounded).

Three kinds of partner: the image itself at the anchor points (self term, ``b = a``,
``v = u``), a k-nearest-neighbour image at the partner points (kNN term), and, for each of
``neg_samples`` random derangements ``pi`` of the batch, image ``pi(a)`` at the partner points of
slot ``a`` (random term; the ``neg_samples`` terms are averaged). The loss is
``pos_intra_weight * self + pos_inter_weight * knn + neg_inter_weight * random``.

This is the official ``ContrastiveCorrelationLoss`` (as shipped with STEGO and the HP
repository) with three differences that do not change its expectation: randomness comes from a
``torch.Generator`` (drawn on the CPU, then moved), the negatives are uniform derangements
instead of "random permutation with fixed points bumped by one" (which is not always a
permutation), and the sample grid is not transposed before ``grid_sample`` (the points are i.i.d.,
so the transpose only relabels them).

kNN partners (STEGO precomputes them once per dataset): :func:`knn_indices` ranks images by
cosine similarity of their globally average-pooled backbone features, chunk by chunk;
:func:`sample_knn_partner` picks one of an image's ``k`` neighbours uniformly per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import ConfigError

__all__ = [
    "StegoConfig",
    "StegoLoss",
    "StegoSamples",
    "calibrated_shifts",
    "draw_stego_samples",
    "knn_indices",
    "random_derangement",
    "sample_knn_partner",
    "stego_correspondence_loss",
    "stego_loss_from_samples",
    "tensor_correlation",
]

_EPS = 1e-10


@dataclass
class StegoConfig:
    """Correspondence-loss hyper-parameters; defaults are the COCO-Stuff-27 values of the
    official configuration.

    feature_samples: ``S``, the sample grid is ``S x S`` points per image; neg_samples: random
    derangements (negative partners) per step; ``*_weight`` / ``*_shift``: weight and shift ``b``
    of the self (intra), kNN (inter) and random-negative terms; pointwise: centre each anchor
    point's feature correlations; zero_clamp: clamp code correlations at 0 from below;
    stabilize: clamp them at 0.8 from above.
    """

    feature_samples: int = 11
    neg_samples: int = 5
    pos_intra_weight: float = 0.67
    pos_inter_weight: float = 0.25
    neg_inter_weight: float = 0.63
    pos_intra_shift: float = 0.08
    pos_inter_shift: float = 0.02
    neg_inter_shift: float = 0.66
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False

    def validate(self) -> None:
        for name in ("feature_samples", "neg_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: must be an integer, got {value!r}")
        if self.feature_samples < 1:
            raise ConfigError(f"feature_samples: must be >= 1, got {self.feature_samples}")
        if self.neg_samples < 0:
            raise ConfigError(f"neg_samples: must be >= 0, got {self.neg_samples}")
        for name in ("pos_intra_weight", "pos_inter_weight", "neg_inter_weight",
                     "pos_intra_shift", "pos_inter_shift", "neg_inter_shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}: must be a finite number, got {value!r}")
            if name.endswith("_weight") and value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        for name in ("pointwise", "zero_clamp", "stabilize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def tensor_correlation(a: Tensor, b: Tensor) -> Tensor:
    """``out[n, i, j, p, q] = a_hat[n, :, i, j] . b_hat[n, :, p, q]`` with ``x_hat`` the
    channel-wise L2-normalised ``x`` (``a [B, C, h, w]``, ``b [B, C, p, q]`` -> ``[B, h, w, p, q]``)."""
    if a.dim() != 4 or b.dim() != 4 or a.shape[:2] != b.shape[:2]:
        raise ValueError(f"tensor_correlation expects a [B, C, h, w] and b [B, C, p, q]; "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.einsum("nchw,ncpq->nhwpq", F.normalize(a, dim=1, eps=_EPS), F.normalize(b, dim=1, eps=_EPS))


def random_derangement(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of ``range(n)`` without fixed points (``n >= 2``), by
    rejection sampling of ``torch.randperm`` (about ``e`` draws on average). Long tensor, CPU."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    identity = torch.arange(n)
    for _ in range(10_000):
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == identity).any()):
            return perm
    # Practically unreachable (probability about 0.63 ** 10000): fall back to a shifted cycle.
    shift = int(torch.randint(1, n, (1,), generator=generator))
    return torch.roll(identity, shift)


class StegoSamples(NamedTuple):
    """The random draws of one loss evaluation.

    anchor: ``[B, S, S, 2]`` anchor points ``(x, y)`` in ``[-1, 1]``; partner: ``[B, S, S, 2]``
    partner points; negatives: ``[neg_samples, B]`` derangements, row ``r`` pairs image ``a``
    with image ``negatives[r, a]``.
    """

    anchor: Tensor
    partner: Tensor
    negatives: Tensor


def draw_stego_samples(batch_size: int, config: StegoConfig, generator: torch.Generator | None = None) -> StegoSamples:
    """Draw the sample points and negative derangements, in this order: anchor points, partner
    points (``torch.rand``, float32, CPU), then ``neg_samples`` derangements."""
    s = config.feature_samples
    anchor = torch.rand(batch_size, s, s, 2, generator=generator) * 2 - 1
    partner = torch.rand(batch_size, s, s, 2, generator=generator) * 2 - 1
    if config.neg_samples > 0:
        negatives = torch.stack([random_derangement(batch_size, generator) for _ in range(config.neg_samples)])
    else:
        negatives = torch.empty(0, batch_size, dtype=torch.long)
    return StegoSamples(anchor, partner, negatives)


def _sample(x: Tensor, coords: Tensor) -> Tensor:
    """Bilinear read of ``x [B, C, h, w]`` at ``coords [B, S, S, 2]`` -> ``[B, C, S, S]``."""
    return F.grid_sample(x, coords.to(device=x.device, dtype=x.dtype), mode="bilinear", padding_mode="border",
                         align_corners=True)


def _feature_correlation(f1: Tensor, f2: Tensor, config: StegoConfig) -> Tensor:
    """``F`` of one term, ``[B, S, S, S, S]``, centred pointwise when ``config.pointwise``."""
    fd = tensor_correlation(f1, f2)
    if config.pointwise:
        old_mean = fd.mean()
        fd = fd - fd.mean(dim=(3, 4), keepdim=True)
        fd = fd - fd.mean() + old_mean
    return fd


def _term(f1: Tensor, f2: Tensor, c1: Tensor, c2: Tensor, shift: float, config: StegoConfig) -> Tensor:
    """Mean of ``-clamp(code corr) * (centred feature corr - shift)`` over the whole batch."""
    with torch.no_grad():
        fd = _feature_correlation(f1, f2, config)
    cd = tensor_correlation(c1, c2)
    if config.zero_clamp or config.stabilize:
        cd = cd.clamp(min=0.0 if config.zero_clamp else None, max=0.8 if config.stabilize else None)
    return -(cd * (fd - shift)).mean()


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def stego_loss_from_samples(feats: Tensor, feats_knn: Tensor, code: Tensor, code_knn: Tensor, samples: StegoSamples,
                            config: StegoConfig) -> tuple[Tensor, dict[str, float]]:
    """The loss for given draws (see :func:`stego_correspondence_loss`)."""
    if feats.dim() != 4 or code.dim() != 4 or feats.shape[0] != code.shape[0]:
        raise ValueError(f"expected feats [B, D, h, w] and code [B, C, h, w] of the same batch; "
                         f"got {tuple(feats.shape)} and {tuple(code.shape)}")
    if feats_knn.shape != feats.shape or code_knn.shape != code.shape:
        raise ValueError(f"feats_knn / code_knn must match feats / code; got {tuple(feats_knn.shape)} vs "
                         f"{tuple(feats.shape)} and {tuple(code_knn.shape)} vs {tuple(code.shape)}")
    batch = feats.shape[0]
    s = config.feature_samples
    for name, t in (("anchor", samples.anchor), ("partner", samples.partner)):
        if tuple(t.shape) != (batch, s, s, 2):
            raise ValueError(f"samples.{name}: expected shape {(batch, s, s, 2)}, got {tuple(t.shape)}")
    if tuple(samples.negatives.shape) != (config.neg_samples, batch):
        raise ValueError(f"samples.negatives: expected shape {(config.neg_samples, batch)}, "
                         f"got {tuple(samples.negatives.shape)}")
    with torch.autocast(code.device.type, enabled=False):
        code_f = code.to(_compute_dtype(code))
        code_knn_f = code_knn.to(code_f.dtype)
        with torch.no_grad():
            feats_f = feats.detach().to(_compute_dtype(feats))
            feats_knn_f = feats_knn.detach().to(feats_f.dtype)
            f_anchor = _sample(feats_f, samples.anchor)
            f_knn = _sample(feats_knn_f, samples.partner)
        c_anchor = _sample(code_f, samples.anchor)
        c_knn = _sample(code_knn_f, samples.partner)

        self_loss = _term(f_anchor, f_anchor, c_anchor, c_anchor, config.pos_intra_shift, config)
        knn_loss = _term(f_anchor, f_knn, c_anchor, c_knn, config.pos_inter_shift, config)
        neg_terms = []
        for perm in samples.negatives:
            perm = perm.to(code.device)
            with torch.no_grad():
                f_neg = _sample(feats_f[perm.to(feats.device)], samples.partner)
            c_neg = _sample(code_f[perm], samples.partner)
            neg_terms.append(_term(f_anchor, f_neg, c_anchor, c_neg, config.neg_inter_shift, config))
        rand_loss = torch.stack(neg_terms).mean() if neg_terms else code_f.new_zeros(())
        total = (config.pos_intra_weight * self_loss + config.pos_inter_weight * knn_loss
                 + config.neg_inter_weight * rand_loss)
    stats = {"self_loss": float(self_loss.detach()), "knn_loss": float(knn_loss.detach()),
             "rand_loss": float(rand_loss.detach())}
    return total, stats


def stego_correspondence_loss(feats: Tensor, feats_knn: Tensor, code: Tensor, code_knn: Tensor,
                              config: StegoConfig | None = None,
                              generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """STEGO's correspondence loss of a batch (see the module docstring for the exact formula).

    Args:
        feats: ``[B, D, h, w]`` frozen backbone features (never receive gradient).
        feats_knn: ``[B, D, h, w]`` features of a kNN partner image of each image.
        code: ``[B, C, h', w']`` head output of the images.
        code_knn: ``[B, C, h', w']`` head output of the partner images.
        config: hyper-parameters (default :class:`StegoConfig`).
        generator: source of the sample points and derangements (CPU generator; ``None`` = the
            global RNG); the draws are :func:`draw_stego_samples`.

    Returns:
        ``(total, {"self_loss", "knn_loss", "rand_loss"})``: the weighted sum (a scalar with
        gradient to ``code`` and ``code_knn``; float32, or float64 for float64 codes) and the
        three unweighted terms as floats. Needs ``B >= 2`` when ``neg_samples > 0``.
    """
    config = config or StegoConfig()
    config.validate()
    if config.neg_samples > 0 and feats.shape[0] < 2:
        raise ValueError(f"the random-negative term needs a batch of at least 2 images, got {feats.shape[0]}")
    samples = draw_stego_samples(feats.shape[0], config, generator)
    return stego_loss_from_samples(feats, feats_knn, code, code_knn, samples, config)


@torch.no_grad()
def calibrated_shifts(feats: Tensor, feats_knn: Tensor, quantiles: tuple[float, float, float],
                      config: StegoConfig | None = None, generator: torch.Generator | None = None
                      ) -> tuple[float, float, float]:
    """Label-free shifts ``(pos_intra, pos_inter, neg_inter)``: the given quantiles of each term's
    feature correlations ``F`` (centred as the loss centres them) on sample points drawn as
    training draws them.

    The shift is the line between pairs the loss pulls together (``F > shift``) and pairs it
    pushes apart, so a quantile ``q`` makes the fraction ``1 - q`` of the pairs attract. The
    published shifts were tuned by hand per dataset and backbone; a backbone whose patches are
    all more alike (a higher mean ``F``) turns them into "attract almost everything", and the
    codes collapse to one cluster.

    Args:
        feats / feats_knn: ``[B, D, h, w]`` backbone features of images and of a kNN partner of
            each (``B >= 2``).
        quantiles: ``(self, knn, random)`` quantiles in ``[0, 1]``.
    """
    config = config or StegoConfig()
    samples = draw_stego_samples(feats.shape[0], config, generator)
    feats = feats.to(_compute_dtype(feats))
    anchor = _sample(feats, samples.anchor)
    knn = _sample(feats_knn.to(feats.dtype), samples.partner)
    terms = [_feature_correlation(anchor, anchor, config), _feature_correlation(anchor, knn, config)]
    negatives = samples.negatives if len(samples.negatives) else random_derangement(feats.shape[0], generator)[None]
    terms.append(torch.cat([_feature_correlation(anchor, _sample(feats[perm], samples.partner), config).flatten()
                            for perm in negatives]))
    return tuple(float(torch.quantile(t.flatten()[:1 << 24], q)) for t, q in zip(terms, quantiles))  # type: ignore[return-value]


class StegoLoss(nn.Module):
    """Module form of :func:`stego_correspondence_loss`, holding its :class:`StegoConfig`."""

    def __init__(self, config: StegoConfig | None = None) -> None:
        super().__init__()
        self.config = config or StegoConfig()
        self.config.validate()

    def forward(self, feats: Tensor, feats_knn: Tensor, code: Tensor, code_knn: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
        return stego_correspondence_loss(feats, feats_knn, code, code_knn, self.config, generator)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())


# ---------------------------------------------------------------------------------------------
# kNN partners


@torch.no_grad()
def knn_indices(pooled: Tensor, k: int, exclude_self: bool = True, chunk_size: int = 1024) -> Tensor:
    """Indices ``[N, k]`` (int64, on ``pooled``'s device) of each row's ``k`` most
    cosine-similar rows of ``pooled [N, D]`` (globally average-pooled backbone features,
    ``feats.mean((2, 3))``), most similar first; row ``i`` itself is never returned when
    ``exclude_self``. Similarities are computed ``chunk_size`` rows at a time (float32, or float64
    for float64 input), so memory is ``chunk_size x N``. Ties are ordered arbitrarily.
    """
    if pooled.dim() != 2:
        raise ValueError(f"knn_indices expects pooled features [N, D], got {tuple(pooled.shape)}")
    n = pooled.shape[0]
    available = n - 1 if exclude_self else n
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        raise ConfigError(f"k: must be an integer in [1, {available}] for {n} images"
                          f"{' (self excluded)' if exclude_self else ''}, got {k!r}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size: must be >= 1, got {chunk_size}")
    x = F.normalize(pooled.to(_compute_dtype(pooled)), dim=1, eps=_EPS)
    out = torch.empty(n, k, dtype=torch.long, device=pooled.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = x[start:stop] @ x.T
        if exclude_self:
            rows = torch.arange(stop - start, device=sims.device)
            sims[rows, rows + start] = -math.inf
        out[start:stop] = sims.topk(k, dim=1).indices
    return out


def sample_knn_partner(knn: Tensor, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One neighbour per image: ``knn[index[i], r_i]`` with ``r_i`` uniform in ``[0, k)``
    (drawn on the CPU from ``generator``). ``knn [N, k]``, ``index [B]`` -> ``[B]`` on
    ``knn``'s device."""
    if knn.dim() != 2 or index.dim() != 1:
        raise ValueError(f"expected knn [N, k] and index [B]; got {tuple(knn.shape)} and {tuple(index.shape)}")
    choice = torch.randint(0, knn.shape[1], (index.shape[0],), generator=generator)
    return knn[index.to(knn.device), choice.to(knn.device)]
