"""Pseudo-masks from class activation maps.

Rule for each pixel of an image, given its CAMs ``[K, H, W]`` in ``[0, 1]`` and its tags:

- with ``refine: par``, the CAMs are first refined along the image's colours (and, with
  ``par.feature_weight > 0``, the classifier's features at scale 1)
  (:func:`~labelwise.eval.pixel_adaptive.pixel_adaptive_refine`, parameters ``par``); the
  refined maps stay in ``[0, 1]`` and untagged classes stay 0;

- the candidates are the tagged classes, plus the background class (``background_class``) when
  the dataset has one; the background's score is the constant ``background_threshold``, so a
  pixel is background when no tagged class's CAM exceeds it. Datasets where every pixel belongs
  to some class (CamVid, aerial) set ``background_class: null``: the label is the argmax over the
  tagged classes;
- with ``crf``, the candidates' scores become probabilities (softmax of ``crf_scale * score``)
  refined by the dense CRF (pydensecrf2, DESIGN.md parameters), and the label is the argmax of
  the refined marginals;
- confidence is the margin between the best and the second-best candidate (infinite with one
  candidate); the ``ignore_fraction`` least-confident pixels of each image (at least that
  many when margins tie; never a pixel with a single candidate) become ``ignore_index``, so that
  the second stage learns from the confident part only. An image with no candidate at all is
  ignored entirely.

The thresholds are fixed numbers, not fitted to any labels (the benchmark splits included):
``background_threshold`` 0.4 and ``ignore_fraction`` 0.2 by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from labelwise.errors import ConfigError
from labelwise.eval.crf import CRFParams, crf_refine_batch
from labelwise.eval.pixel_adaptive import PixelAdaptiveConfig, pixel_adaptive_refine

__all__ = ["PseudoMaskConfig", "pseudo_masks", "refine_cams"]


@dataclass
class PseudoMaskConfig:
    """See the module docstring."""

    background_class: int | None = None
    background_threshold: float = 0.4
    refine: Literal["none", "par"] = "none"
    par: PixelAdaptiveConfig = field(default_factory=PixelAdaptiveConfig)
    ignore_fraction: float = 0.2
    crf: bool = False
    crf_scale: float = 10.0
    crf_timeout: float = 600.0
    ignore_index: int = 255

    def validate(self, num_classes: int) -> None:
        if self.background_class is not None and not 0 <= self.background_class < num_classes:
            raise ConfigError(f"pseudo_masks.background_class: must be a class index in [0, {num_classes}) or "
                              f"null, got {self.background_class}")
        if not 0 <= self.background_threshold <= 1:
            raise ConfigError(f"pseudo_masks.background_threshold: must be in [0, 1], got {self.background_threshold}")
        if not 0 <= self.ignore_fraction < 1:
            raise ConfigError(f"pseudo_masks.ignore_fraction: must be in [0, 1), got {self.ignore_fraction}")
        if self.crf_scale <= 0:
            raise ConfigError(f"pseudo_masks.crf_scale: must be > 0, got {self.crf_scale}")
        if self.refine not in ("none", "par"):
            raise ConfigError(f"pseudo_masks.refine: must be 'none' or 'par', got {self.refine!r}")
        self.par.validate("pseudo_masks.par")


def refine_cams(cams: Tensor, tags: Tensor, images: Tensor, config: PseudoMaskConfig,
                features: Tensor | None = None) -> Tensor:
    """The CAMs ``[B, K, H, W]`` as the pseudo-mask rule sees them: refined along ``images [B, 3, H, W]``
    (and ``features [B, D, h, w]`` when ``par.feature_weight > 0``) when ``config.refine`` is ``par``
    (untagged classes kept at 0), unchanged otherwise."""
    if config.refine == "none":
        return cams
    refined = pixel_adaptive_refine(images, cams, config.par, features)
    return refined * tags.to(refined.dtype)[:, :, None, None]


def _candidate_scores(cams: Tensor, tags: Tensor, config: PseudoMaskConfig) -> Tensor:
    """``[B, K, H, W]`` scores with non-candidates at ``-inf``."""
    candidates = tags.bool().clone()
    scores = cams.float().clone()
    if config.background_class is not None:
        candidates[:, config.background_class] = True
        scores[:, config.background_class] = config.background_threshold
    return scores.masked_fill(~candidates[:, :, None, None], -math.inf)


def _margin(scores: Tensor) -> Tensor:
    """Best minus second-best along dim 1 (``inf`` with one finite candidate)."""
    if scores.shape[1] > 1:
        top = scores.topk(2, dim=1).values
    else:
        top = torch.cat([scores, torch.full_like(scores, -math.inf)], 1)
    margin = top[:, 0] - top[:, 1]
    return torch.nan_to_num(margin, nan=-math.inf, posinf=math.inf, neginf=-math.inf)  # no candidate: -inf - -inf


@torch.no_grad()
def pseudo_masks(cams: Tensor, tags: Tensor, config: PseudoMaskConfig | None = None,
                 images: Tensor | None = None) -> Tensor:
    """Labels ``[B, H, W]`` (long, ``ignore_index`` where unsure) from ``cams [B, K, H, W]`` in
    ``[0, 1]`` and ``tags [B, K]`` (module docstring). ``images [B, 3, H, W]`` in [0, 1] are
    needed for the CRF."""
    config = config or PseudoMaskConfig()
    b, k, h, w = cams.shape
    config.validate(k)
    if tags.shape != (b, k):
        raise ValueError(f"tags must be [B, K] = [{b}, {k}], got {list(tags.shape)}")
    scores = _candidate_scores(cams, tags, config)
    if config.crf:
        if images is None or images.shape[0] != b or images.shape[-2:] != (h, w):
            raise ValueError("pseudo_masks: the CRF needs the images [B, 3, H, W] of the CAMs")
        probabilities = torch.softmax(config.crf_scale * scores, dim=1).nan_to_num(0.0)
        rgb = [np.ascontiguousarray((im.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy())
               for im in images.cpu()]
        refined = crf_refine_batch(rgb, [p.numpy().astype(np.float32) for p in probabilities.cpu()], CRFParams(),
                                   timeout=config.crf_timeout)
        marginals = torch.from_numpy(np.stack(refined)).to(scores.device)
        scores = marginals.masked_fill(torch.isinf(scores), -math.inf)
    labels = scores.argmax(1)
    margin = _margin(scores)
    unsure = ~torch.isfinite(margin) & (margin < 0)  # no candidate at all
    if config.ignore_fraction > 0:
        count = max(1, math.ceil(config.ignore_fraction * h * w))
        cut = margin.flatten(1).kthvalue(count, dim=1).values  # per image
        # single-candidate pixels (infinite margin) are certain and never ignored; pixels tied
        # with the cut are all ignored, so at least the fraction is
        unsure |= torch.isfinite(margin) & (margin <= cut[:, None, None])
    return labels.masked_fill(unsure, config.ignore_index)
