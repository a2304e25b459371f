"""The typed configuration of an unsupervised segmentation run (``labelwise unsupervised``).

``load_config(UnsupervisedConfig, "configs/unsupervised_camvid.yaml", ["method=stego"])``;
unknown keys, wrong types and out-of-range values raise
:class:`~labelwise.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from labelwise.config import FLAT_SCHEDULE_KEYS, DataConfig, OptimConfig, RunConfig, ScheduleConfig, StageConfig
from labelwise.errors import ConfigError
from labelwise.losses.stego import StegoConfig

METHODS = ("hp", "stego", "picie", "kmeans", "primaps")


@dataclass
class FeatureConfig:
    """Frozen backbone and the views its features are cached for.

    ``backbone``: a ViT name ``resolve_backbone`` knows (``labelwise_default``, ``dino_vits8`` ...)
    or checkpoint path; a CNN weights name (``mobilenet_v2_imagenet``, optionally
    ``@stage4,stage5``); or parts joined by ``+`` (``labelwise_default+mobilenet_v2_imagenet``: each
    part's features L2-normalised and concatenated). See
    :mod:`labelwise.models.feature_backbones`. Training views: ``crop_mode: five`` (four corners + centre, sides
    ``crop_ratio`` of the image's, each resized to ``crop_size``) or ``whole`` (the image resized
    to ``crop_size``). Evaluation and prediction images are resized to ``eval_size`` ((H, W);
    None: as loaded; their size must then be the same for the whole split). ``window``: cut large
    images (aerial tiles) into windows of this many pixels, each labeled pixel scored once
    (:class:`~labelwise.methods.unsupervised.data.TileWindows`); training then takes its views
    from the windows of the whole training tiles. ``attention_block``:
    the block whose attention gives HP's local positives (-1: the last; ViT backbones). ``storage``: cache arrays
    in ``float16`` (half the disk; the features are rounded, so a hard threshold such as HP's
    positive selection can flip for borderline pairs) or ``float32`` (exactly the on-the-fly values).
    """

    backbone: str = "labelwise_default"
    crop_mode: Literal["five", "whole"] = "five"
    crop_ratio: float = 0.5
    crop_size: int = 224
    eval_size: tuple[int, int] | None = None
    window: int | None = None
    attention_block: int = -1
    batch_size: int = 32
    cache_dir: str | None = None
    storage: Literal["float16", "float32"] = "float16"


@dataclass
class HPSettings:
    """Hidden Positives (DESIGN.md): head width ``dim``; ``task_specific`` / ``local`` switch the
    task-specific positives and the LHP term (the ablation rows); ``lambda_warmup_steps`` before
    lambda starts rising; pools of ``pool_size`` patches, the task-specific one rebuilt every
    ``renew_every`` steps; ``consistency_weight`` of the photometric term (0 disables it and its
    second feature cache).

    Local positive weights (``local_weights``): ``attention`` (the paper: the last block's patch
    attention; ViT backbones only), ``affinity`` (the same rule on the backbone's feature cosine
    affinity, :func:`~labelwise.features.attention.affinity_local_weights`; any backbone) or
    ``auto`` (attention for a ViT, affinity otherwise).

    Weak-backbone guards (label-free): ``specific_positives: agreeing`` (default) keeps a
    task-specific positive only where the backbone's criterion also holds (``all``: the paper's
    rule, which merged the classes of our ViT-T on CamVid: 0.104 / 0.110 for ``hp_ag_sp`` /
    ``hp_full`` against 0.169 / 0.150 with ``agreeing``, BENCHMARKS.md);
    ``collapse_guard`` (a ratio, e.g. 0.9): at every pool renewal the task-specific pool's codes
    are clustered into K by k-means and the normalised entropy of the cluster sizes is logged
    (``code_entropy``); once lambda rises, the first time the entropy falls below
    ``collapse_guard`` times its value at the end of the warm-up, lambda is held where it is for
    the rest of the run; ``lambda_max`` caps lambda (1: the paper)."""

    dim: int = 512
    dropout: float = 0.1
    momentum: float = 0.99
    pool_size: int = 2048
    renew_every: int = 100
    lambda_warmup_steps: int = 100
    temperature: float = 0.8
    rho: float = 0.02
    task_specific: bool = True
    local: bool = True
    consistency_weight: float = 0.05
    attention_scale: float | None = None
    precision: Literal["bf16", "mixed", "fp32"] = "mixed"
    local_weights: Literal["auto", "attention", "affinity"] = "auto"
    specific_positives: Literal["all", "agreeing"] = "agreeing"
    collapse_guard: float | None = None
    lambda_max: float = 1.0


@dataclass
class PrimapsSettings:
    """PriMaPs (:mod:`labelwise.features.primaps`): per-image mask proposals from the principal
    directions of the features, K class prototypes fitted to them by EM over the training views.

    ``threshold``: cosine to a proposal's anchor patch that joins it; ``null`` calibrates it
    label-free as the ``threshold_quantile`` of the within-image patch-pair cosines of the centred
    features on ``calibration_images`` training views. Features are centred by the training
    set's mean feature before proposals and prototypes (``center``). ``coverage`` / ``max_masks``
    stop the proposals of an image; ``em_epochs`` passes over the training views, prototypes
    moving with ``momentum`` per batch of ``batch_size`` views (initialised by k-means on the
    features)."""

    threshold: float | None = None
    threshold_quantile: float = 0.75
    calibration_images: int = 128
    center: bool = True
    coverage: float = 0.95
    max_masks: int = 16
    em_epochs: int = 3
    momentum: float = 0.9
    batch_size: int = 64


@dataclass
class StegoSettings(StegoConfig):
    """STEGO's correspondence loss (the :class:`~labelwise.losses.stego.StegoConfig` fields,
    cocostuff defaults), the head width ``dim`` and its ``dropout``, and ``knn`` neighbours per
    image for the kNN pairs.

    ``shifts``: ``calibrated`` (default) replaces the three ``*_shift`` values, before training,
    by quantiles of the backbone's own feature correlations on ``calibration_images`` training
    views (:func:`~labelwise.losses.stego.calibrated_shifts`; no labels): ``calibration_quantiles``
    ``[self, knn, random]``, where ``null`` for random means ``1 - 1/K`` (K clusters: two random
    patches share a cluster about that rarely). ``fixed`` uses the ``*_shift`` values as given;
    the published ones were tuned per dataset and backbone and collapse the codes of a backbone
    whose patches are all more alike.
    """

    dim: int = 512
    dropout: float = 0.1
    knn: int = 7
    shifts: Literal["calibrated", "fixed"] = "calibrated"
    calibration_quantiles: list[float | None] = field(default_factory=lambda: [0.5, 0.5, None])
    calibration_images: int = 256


@dataclass
class ClusteringSettings:
    """PiCIE-style clustering loss: prototypes re-fitted by k-means on ``fit_points`` head codes
    every ``recluster_every`` steps (one epoch by default), cross-entropy at ``temperature``."""

    dim: int = 512
    dropout: float = 0.1
    clusters: int | None = None
    temperature: float = 0.1
    recluster_every: int | None = None
    fit_points: int = 100_000


@dataclass
class UnsupervisedEvalConfig:
    """Evaluation: cluster probe (``clusters`` K centroids, default the number of classes), the
    linear probe (train-split labels; a feature-quality number), optional dense CRF
    (DESIGN.md parameters) with ``crf_workers`` processes and a ``crf_timeout`` per batch."""

    clusters: int | None = None
    linear_probe: bool = True
    crf: bool = False
    crf_workers: int | None = None
    crf_timeout: float = 600.0
    probe_pixels_per_image: int = 1024


@dataclass
class UnsupervisedConfig(RunConfig, ScheduleConfig):
    """Everything an unsupervised run needs.

    ``images``: folders of unlabeled training images (``--images DIR``); when empty, the
    training images are those of ``data`` (its labels are never read for training). The head
    trains in one stage (``stages: [{steps, lr, schedule}]``, constant lr by default) of
    ``batch_size`` cached views per step, with ``optim`` (AdamW, weight decay 0.1, gradient
    clipping at 10). The reported model is the final one (``selection: final_checkpoint``: no
    labels are used to choose it). Top-level ``steps`` / ``lr`` / ``weight_decay`` /
    ``grad_clip`` (the earlier layout) are read at their new place with a warning.
    """

    moved_keys: ClassVar[dict[str, str]] = FLAT_SCHEDULE_KEYS

    data: DataConfig = field(default_factory=DataConfig)
    images: list[str] = field(default_factory=list)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    method: Literal["hp", "stego", "picie", "kmeans", "primaps"] = "hp"
    hp: HPSettings = field(default_factory=HPSettings)
    primaps: PrimapsSettings = field(default_factory=PrimapsSettings)
    stego: StegoSettings = field(default_factory=StegoSettings)
    clustering: ClusteringSettings = field(default_factory=ClusteringSettings)
    eval: UnsupervisedEvalConfig = field(default_factory=UnsupervisedEvalConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", weight_decay=0.1, grad_clip=10.0))
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(steps=1000, lr=5e-4,
                                                                            schedule="constant")])
    batch_size: int = 64
    run_dir: str = "runs/unsupervised"
    checkpoint_every: int = 250

    def validate(self) -> None:
        """Range checks (errors name the dotted key)."""
        self.validate_run()
        if self.data.bands == "RGBIR":
            raise ConfigError("data.bands: the feature backbones take RGB images; use RGB or IRRG")
        self.validate_schedule()
        self.validate_single_stage("unsupervised training", "views are set in features, their batch in batch_size")
        positive = {"batch_size": self.batch_size,
                    "features.crop_size": self.features.crop_size, "features.batch_size": self.features.batch_size,
                    "hp.dim": self.hp.dim, "hp.pool_size": self.hp.pool_size, "hp.renew_every": self.hp.renew_every,
                    "hp.temperature": self.hp.temperature, "stego.dim": self.stego.dim, "stego.knn": self.stego.knn,
                    "stego.feature_samples": self.stego.feature_samples, "clustering.dim": self.clustering.dim,
                    "clustering.temperature": self.clustering.temperature,
                    "clustering.fit_points": self.clustering.fit_points, "checkpoint_every": self.checkpoint_every,
                    "log_every": self.log_every, "eval.crf_timeout": self.eval.crf_timeout}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        for key, value in (("hp.lambda_warmup_steps", self.hp.lambda_warmup_steps),
                           ("hp.consistency_weight", self.hp.consistency_weight),
                           ("stego.neg_samples", self.stego.neg_samples)):
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value}")
        for key, value in (("hp.dropout", self.hp.dropout), ("stego.dropout", self.stego.dropout),
                           ("clustering.dropout", self.clustering.dropout), ("hp.rho", self.hp.rho)):
            if not 0 <= value <= 1:
                raise ConfigError(f"{key}: must be in [0, 1], got {value}")
        if not 0 < self.features.crop_ratio <= 1:
            raise ConfigError(f"features.crop_ratio: must be in (0, 1], got {self.features.crop_ratio}")
        if self.hp.collapse_guard is not None and not 0 < self.hp.collapse_guard < 1:
            raise ConfigError(f"hp.collapse_guard: must be in (0, 1) or null, got {self.hp.collapse_guard}")
        if not 0 < self.hp.lambda_max <= 1:
            raise ConfigError(f"hp.lambda_max: must be in (0, 1], got {self.hp.lambda_max}")
        primaps = self.primaps
        if primaps.threshold is not None and not -1 < primaps.threshold < 1:
            raise ConfigError(f"primaps.threshold: must be in (-1, 1) or null, got {primaps.threshold}")
        for key, value in (("primaps.threshold_quantile", primaps.threshold_quantile),
                           ("primaps.coverage", primaps.coverage)):
            if not 0 < value <= 1:
                raise ConfigError(f"{key}: must be in (0, 1], got {value}")
        if not 0 <= primaps.momentum < 1:
            raise ConfigError(f"primaps.momentum: must be in [0, 1), got {primaps.momentum}")
        for key, value in (("primaps.max_masks", primaps.max_masks), ("primaps.em_epochs", primaps.em_epochs),
                           ("primaps.batch_size", primaps.batch_size),
                           ("primaps.calibration_images", primaps.calibration_images)):
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if not 0 <= self.hp.momentum < 1:
            raise ConfigError(f"hp.momentum: must be in [0, 1), got {self.hp.momentum}")
        quantiles = self.stego.calibration_quantiles
        if len(quantiles) != 3 or any(q is not None and not 0 <= q <= 1 for q in quantiles) or None in quantiles[:2]:
            raise ConfigError(f"stego.calibration_quantiles: must be [self, knn, random] in [0, 1] (random may be "
                              f"null), got {quantiles}")
        if self.stego.calibration_images < 2:
            raise ConfigError(f"stego.calibration_images: must be >= 2, got {self.stego.calibration_images}")
        try:
            self.stego.validate()
        except ConfigError as exc:
            raise ConfigError(f"stego.{exc}") from exc
        for key, value in (("eval.clusters", self.eval.clusters), ("clustering.clusters", self.clustering.clusters),
                           ("clustering.recluster_every", self.clustering.recluster_every)):
            if value is not None and value < 1:
                raise ConfigError(f"{key}: must be >= 1 or null, got {value}")
        if self.features.window is not None and self.features.window < 16:
            raise ConfigError(f"features.window: must be >= 16 pixels or null, got {self.features.window}")
        if self.features.eval_size is not None and min(self.features.eval_size) < 1:
            raise ConfigError(f"features.eval_size: must be two positive sizes or null, got {self.features.eval_size}")
