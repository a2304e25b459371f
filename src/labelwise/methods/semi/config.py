"""Typed configuration of semi-supervised training (``labelwise semi train``).

A :class:`SemiConfig` is a :class:`~labelwise.config.TrainConfig` (data, model, loss, optimiser,
stages, evaluation: any ``labelwise train`` YAML works) plus a ``semi`` section,
:class:`SemiSettings`. The labeled part is the training split restricted by
``data.train_list``; the unlabeled part is ``semi.unlabeled`` (folders of images) or
``semi.unlabeled_list`` (names of training-split samples whose masks are then never read) or, for
aerial data, ``semi.unlabeled_tiles`` (random ``data.tile_crop`` crops of those tiles, masks
dropped).
Validated at load time with errors that name the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from labelwise.config import TrainConfig
from labelwise.errors import ConfigError

__all__ = ["METHODS", "SemiConfig", "SemiSettings"]

METHODS = ("supervised_only", "fixmatch", "unimatch", "self_training")


@dataclass
class SemiSettings:
    """The semi-supervised part of a run.

    - ``method``: ``supervised_only`` (the labeled subset alone: every table's baseline),
      ``fixmatch`` (one strong view of each unlabeled image trained to match the confident
      weak-view pseudo-labels), ``unimatch`` (two strong views plus a feature-perturbation stream;
      loss ``(L_sup + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2``) or ``self_training`` (``rounds``
      of: train, pseudo-label the unlabeled images' confident pixels, retrain on both).
    - ``threshold``: confidence a weak-view pixel needs to become a pseudo-label (0.95, online
      methods).
    - ``self_training_threshold``: confidence a pixel needs to be pseudo-labeled between
      self-training rounds (0.6). Offline pseudo-labels come from a model trained on the labeled
      images alone, which is rarely 95% sure: on the synthetic set at 0.9 only 19% of the pixels
      were kept and the next round was worse than its teacher; 0.8 kept 62% (+1.2 mIoU), 0.6 kept
      81% (+4.9).
    - ``unsup_weight``: FixMatch's weight of the strong-view loss (``L_sup + w L_s``).
    - ``feature_dropout``: channel-dropout probability of the UniMatch feature stream (0.5).
    - ``cutmix_probability``: probability that a strong view gets a CutMix box (0.5).
    - ``ema_teacher``: pseudo-labels from an exponential moving average of the model
      (``ema_momentum``) instead of the model itself.
    - ``transform_consistency``: weight of an extra term making the predictions on unlabeled
      images equivariant to flips and 90-degree rotations (0 = off).
    - ``rotation_weight``: weight of the rotation-prediction auxiliary loss (S4L) on the
      unlabeled images (0 = off).
    - ``rounds``: self-training rounds after the first (teacher) training.
    - ``teacher``: self-training only; a finished labelwise model (a run folder or a folder with
      ``model.json`` + ``weights.safetensors``, e.g. a ``supervised_only`` run on the same labeled
      subset) used as the round-0 teacher instead of training one. Its classes must match.

    Each step takes as many unlabeled images as labeled ones (``data.batch_size``), as UniMatch
    does.
    """

    method: Literal["supervised_only", "fixmatch", "unimatch", "self_training"] = "unimatch"
    unlabeled: list[str] = field(default_factory=list)
    unlabeled_list: str | None = None
    unlabeled_tiles: list[int | str] = field(default_factory=list)
    threshold: float = 0.95
    self_training_threshold: float = 0.6
    unsup_weight: float = 1.0
    feature_dropout: float = 0.5
    cutmix_probability: float = 0.5
    ema_teacher: bool = False
    ema_momentum: float = 0.999
    transform_consistency: float = 0.0
    rotation_weight: float = 0.0
    rounds: int = 1
    teacher: str | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"semi.method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        sources = sum(bool(x) for x in (self.unlabeled, self.unlabeled_list, self.unlabeled_tiles))
        if self.method != "supervised_only" and not sources:
            raise ConfigError(f"semi.unlabeled: method {self.method} needs unlabeled images (folders in "
                              "semi.unlabeled, a list file in semi.unlabeled_list or aerial semi.unlabeled_tiles)")
        if sources > 1:
            raise ConfigError("semi.unlabeled / semi.unlabeled_list / semi.unlabeled_tiles: give one of them")
        for key, value, low, high in (("threshold", self.threshold, 0.0, 1.0),
                                      ("self_training_threshold", self.self_training_threshold, 0.0, 1.0),
                                      ("feature_dropout", self.feature_dropout, 0.0, 0.99),
                                      ("cutmix_probability", self.cutmix_probability, 0.0, 1.0),
                                      ("ema_momentum", self.ema_momentum, 0.0, 1.0)):
            if not low <= value <= high:
                raise ConfigError(f"semi.{key}: must be in [{low}, {high}], got {value}")
        for key, value in (("unsup_weight", self.unsup_weight), ("transform_consistency", self.transform_consistency),
                           ("rotation_weight", self.rotation_weight)):
            if value < 0:
                raise ConfigError(f"semi.{key}: must be >= 0, got {value}")
        if self.rounds < 1:
            raise ConfigError(f"semi.rounds: must be >= 1, got {self.rounds}")
        if self.teacher is not None and self.method != "self_training":
            raise ConfigError(f"semi.teacher: only self_training uses a teacher model, method is {self.method}")


@dataclass
class SemiConfig(TrainConfig):
    """A ``labelwise train`` configuration plus the ``semi`` section (module docstring)."""

    semi: SemiSettings = field(default_factory=SemiSettings)
    run_dir: str = "runs/semi"

    def validate(self) -> None:
        super().validate()
        self.semi.validate()
        if (self.model.name == "wide_context" and self.semi.method != "supervised_only"
                and not self.semi.unlabeled_tiles):
            raise ConfigError(f"semi.unlabeled_tiles: a wide_context model takes each window's context from its whole "
                              f"tile, so semi.method {self.semi.method} needs unlabeled tiles (semi.unlabeled_tiles), "
                              "not single images (semi.unlabeled / semi.unlabeled_list)")
