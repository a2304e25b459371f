"""Typed configuration of weak supervision (``labelwise weak``); validated at load time with
errors that name the dotted key."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

from labelwise.config import FLAT_SCHEDULE_KEYS, DataConfig, OptimConfig, RunConfig, ScheduleConfig, StageConfig
from labelwise.errors import ConfigError
from labelwise.methods.weak.cams import CAMConfig
from labelwise.methods.weak.pseudo_masks import PseudoMaskConfig

__all__ = ["SelfTrainingConfig", "WeakConfig"]


@dataclass
class SelfTrainingConfig:
    """``self_training`` of :class:`WeakConfig` (:mod:`~labelwise.methods.weak.self_training`).

    ``rounds``: self-training rounds after the segmenter trained on the CAM pseudo-masks (0: off).
    ``keep_fraction`` in (0, 1]: per image and per predicted class, the share of that class's
    pixels kept as labels (the most confident). ``segmenter_overrides``: ``KEY=VALUE`` applied
    to the round segmenters after the run's own ``segmenter_overrides`` (e.g.
    ``stages.0.steps=500``).
    """

    rounds: int = 0
    keep_fraction: float = 0.5
    segmenter_overrides: list[str] = field(default_factory=list)

    def validate(self, prefix: str = "self_training") -> None:
        """Range checks (errors name the dotted key)."""
        if self.rounds < 0:
            raise ConfigError(f"{prefix}.rounds: must be >= 0, got {self.rounds}")
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"{prefix}.keep_fraction: must be in (0, 1], got {self.keep_fraction}")
        for index, item in enumerate(self.segmenter_overrides):
            if "=" not in item:
                raise ConfigError(f"{prefix}.segmenter_overrides.{index}: expected KEY=VALUE, got {item!r}")


@dataclass
class WeakConfig(RunConfig, ScheduleConfig):
    """Everything the weak-supervision stages need.

    Training images: the ``images`` folders with the ``tags`` file (class names from
    ``data.class_map``, a ``classes.json``), or, when ``images`` is empty, the training split of
    ``data`` with tags derived from its masks (a class is present when it covers at least
    ``tag_min_fraction`` of an image's labeled pixels; benchmarks). The classifier (``method``,
    :mod:`~labelwise.methods.weak.classifiers`) is ``mct_vit``, a multi-class-token ViT
    (``variant`` v1 / v2) on ``backbone`` (a name or a ViT file; ``hybrid: true``: a convolutional
    stem, trained from scratch, replaces the patch embedding; ``readout``: how the class logits are
    read from the class tokens, the paper's ``mean`` or a per-class ``linear`` readout initialised
    to it, see :class:`~labelwise.models.mctformer.MultiClassTokenViT`); ``cnn_cam``, a pooled
    linear classifier on the pretrained CNN ``encoder`` (``encoder_weights``, dilated to
    ``encoder_output_stride``) whose classifier weights give the CAMs; or ``hybrid``, the
    multi-class-token Transformer of ``backbone`` on that CNN's features as tokens. It is trained
    in one stage (``stages: [{steps, lr}]``: a cosine from ``lr`` after a linear warm-up of
    ``warmup_steps``, at most a tenth of the stage) of ``batch_size`` images resized to
    ``image_size`` (``[H, W]``, multiples of the patch size) with ``optim`` (AdamW, weight decay
    0.05, gradient clipping at 5), horizontal flips with probability ``hflip``.
    ``stages.0.lr`` is the pretrained backbone's learning rate; the parameters the classifier adds (class
    tokens, score readout, patch classifier, hybrid stem) train at ``new_lr_scale * lr``. The
    default 6.25e-5 is the paper's (5e-4 scaled by its batch of 64 / 512, the DeiT rule): a
    larger backbone lr sharpens the tag fit but degrades the patch CAMs (synthetic diagnostic:
    patch-CAM mIoU 0.30 / 0.27 / 0.13 at 6.25e-5 / 1.5e-4 / 5e-4).
    ``cams`` and ``pseudo_masks``: stages 2-3. The second stage (``weak run``) trains
    ``labelwise train``'s segmenter on the pseudo-masks: the ``TrainConfig`` YAML ``segmenter``
    (default: the built-in U-Net defaults) with ``segmenter_overrides`` (``KEY=VALUE``), and with
    class-balanced cross-entropy weights from the pseudo-masks' class frequencies unless the
    overrides set ``loss.class_weights``. ``self_training``: rounds in which the segmenter relabels
    its training images from its own confident, tag-restricted predictions and the same recipe is
    trained again on them (:mod:`~labelwise.methods.weak.self_training`; off by default).
    Top-level ``steps`` / ``lr`` / ``weight_decay`` / ``grad_clip`` (the earlier layout) are read
    at their new place with a warning.
    """

    moved_keys: ClassVar[dict[str, str]] = FLAT_SCHEDULE_KEYS

    data: DataConfig = field(default_factory=DataConfig)
    images: list[str] = field(default_factory=list)
    tags: str | None = None
    tag_min_fraction: float = 0.01
    method: Literal["mct_vit", "cnn_cam", "hybrid"] = "mct_vit"
    backbone: str = "labelwise_default"
    encoder: str = "mobilenet_v2"
    encoder_weights: str | None = "imagenet"
    encoder_output_stride: int = 16
    variant: Literal["v1", "v2"] = "v2"
    hybrid: bool = False
    readout: Literal["mean", "linear"] = "linear"
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", weight_decay=0.05, grad_clip=5.0))
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(steps=1000, lr=6.25e-5, schedule="cosine",
                                                                            warmup_steps=100)])
    batch_size: int = 16
    new_lr_scale: float = 10.0
    hflip: float = 0.5
    run_dir: str = "runs/weak"
    checkpoint_every: int = 250
    cams: CAMConfig = field(default_factory=CAMConfig)
    pseudo_masks: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    segmenter: str | None = None
    segmenter_overrides: list[str] = field(default_factory=list)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)

    def schedule(self) -> ScheduleConfig:
        """The classifier's schedule as trained: the stage's warm-up cut to a tenth of its steps."""
        stage = self.stages[0]
        return ScheduleConfig(optim=self.optim,
                              stages=[replace(stage, warmup_steps=min(stage.warmup_steps, stage.steps // 10))])

    def validate(self) -> None:
        """Range checks (errors name the dotted key)."""
        self.validate_run()
        if self.data.bands == "RGBIR":
            raise ConfigError("data.bands: the weak classifiers' backbones take RGB images; use RGB or IRRG")
        self.validate_schedule(warmup_below_steps=False)
        self.validate_single_stage("the weak classifier", "set batch_size, image_size and hflip at the top level")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size: must be > 0, got {self.batch_size}")
        if self.new_lr_scale <= 0:
            raise ConfigError(f"new_lr_scale: must be > 0, got {self.new_lr_scale}")
        if not 0 < self.tag_min_fraction <= 1:
            raise ConfigError(f"tag_min_fraction: must be in (0, 1], got {self.tag_min_fraction}")
        if self.method not in ("mct_vit", "cnn_cam", "hybrid"):
            raise ConfigError(f"method: must be mct_vit, cnn_cam or hybrid, got {self.method!r}")
        if self.encoder_output_stride not in (8, 16):
            raise ConfigError(f"encoder_output_stride: must be 8 or 16, got {self.encoder_output_stride}")
        if self.hybrid and self.method != "mct_vit":
            raise ConfigError(f"hybrid: the scratch convolutional stem applies to method mct_vit only, not "
                              f"{self.method!r} (method: hybrid uses the pretrained encoder)")
        if self.readout not in ("mean", "linear"):
            raise ConfigError(f"readout: must be 'mean' or 'linear', got {self.readout!r}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"hflip: must be in [0, 1], got {self.hflip}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ConfigError(f"image_size: must be [H, W] of positive sizes, got {self.image_size}")
        if self.images and not self.tags:
            raise ConfigError("tags: a tag file is required with images (or leave images empty to derive tags "
                              "from the masks of data)")
        self.cams.validate()
        self.pseudo_masks.par.validate("pseudo_masks.par")
        self.self_training.validate()
