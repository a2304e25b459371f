"""The typed configuration of a self-supervised pretraining run (``labelwise pretrain``).

Loaded like every labelwise config: ``load_config(PretrainConfig, "configs/pretrain_dino_vit_tiny.yaml",
["dino.out_dim=2048"])``; unknown keys, wrong types and out-of-range values raise
:class:`~labelwise.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from labelwise.config import FLAT_SCHEDULE_KEYS, OptimConfig, RunConfig, ScheduleConfig, StageConfig
from labelwise.data.multicrop import MultiCropConfig
from labelwise.errors import ConfigError

METHODS = ("dino", "moco", "dense_moco", "rotation")


@dataclass
class PretrainDataConfig:
    """Unlabeled images: every image file under the ``images`` folders (recursive; ``labels``/
    ``masks`` sub-folders skipped), shrunk on load to ``max_side`` (longer side, ``None``: as
    stored). ``batch_size`` images per step and process, each giving all its crops."""

    images: list[str] = field(default_factory=list)
    max_side: int | None = 320
    on_error: Literal["raise", "skip"] = "raise"
    batch_size: int = 32
    num_workers: int = 0


@dataclass
class BackboneConfig:
    """The network to pretrain.

    ``kind: vit``: ``arch`` (``vit_tiny``, ``vit_small``, ``vit_base``, ``custom``), ``patch_size``,
    ``num_registers``, ``drop_path`` (student only; the teacher has none), plus any other
    ``ViTConfig`` field in ``options`` (``embed_dim``, ``depth``, ``num_heads``, ``layer_scale``,
    ``pos_grid`` ...). ``kind: unet``: the U-Net encoder; ``options`` are ``unet`` model options
    (``width``, ``depth``, ``block`` ...); pooled features are the mean of the deepest map.
    """

    kind: Literal["vit", "unet"] = "vit"
    arch: str = "vit_tiny"
    patch_size: int = 16
    num_registers: int = 0
    drop_path: float = 0.1
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DINOConfig:
    """DINO head and loss; ``ibot`` adds iBOT's masked-patch self-distillation term.

    ``out_dim`` is K (prototypes); the teacher temperature rises linearly from
    ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_steps``;
    ``freeze_last_layer_steps`` keeps the head's last layer fixed for the first steps. iBOT:
    ``mask_prob`` of the global crops get block masks covering ``mask_ratio`` of their patches;
    the patch head (``shared_head``: the [CLS] head itself) has ``patch_out_dim`` outputs and
    its teacher temperature goes from ``warmup_teacher_temp`` to ``patch_teacher_temp``.
    """

    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    norm_last_layer: bool = True
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    freeze_last_layer_steps: int = 0
    ibot: bool = False
    ibot_weight: float = 1.0
    patch_out_dim: int = 4096
    shared_head: bool = False
    patch_teacher_temp: float = 0.07
    mask_prob: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)


@dataclass
class MoCoConfig:
    """MoCo v2 (``moco``) and DenseCL-style (``dense_moco``) settings: projection to ``dim``
    through ``hidden_dim``; InfoNCE at ``temperature`` against a queue of ``queue_size``
    negatives (0: in-batch negatives); ``dense_moco`` mixes ``(1 - dense_weight) * global +
    dense_weight * dense``; ``shuffle_bn`` runs a BatchNorm teacher (U-Net) on two shuffled
    half-batches so that keys cannot match queries through batch statistics."""

    dim: int = 128
    hidden_dim: int = 2048
    temperature: float = 0.2
    queue_size: int = 4096
    dense_weight: float = 0.5
    shuffle_bn: bool = True


@dataclass
class RotationConfig:
    """Rotation prediction: a linear classifier (``hidden_dim: 0``) or a one-hidden-layer MLP."""

    hidden_dim: int = 0


@dataclass
class PretrainConfig(RunConfig, ScheduleConfig):
    """Everything a pretraining run needs.

    Schedule: one stage (``stages: [{steps, lr, min_lr, warmup_steps}]``): the lr warms up
    linearly over ``warmup_steps`` to ``lr`` and decays by a cosine to ``min_lr``; ``epochs``, when
    set, replaces the stage's ``steps`` by that many passes over the images. The weight decay
    follows a cosine from ``optim.weight_decay`` to ``weight_decay_end`` and the teacher momentum
    one from ``teacher_momentum`` to ``teacher_momentum_end`` (DINO's schedules). Top-level
    ``steps`` / ``lr`` / ``min_lr`` / ``warmup_steps`` (the earlier layout) are read at their new
    place with a warning.
    ``export``: which network becomes the exported backbone (``teacher``: the EMA network, as
    DINO evaluates; rotation has no teacher and always exports the student).
    ``init``: start student and teacher from this backbone (any file or run folder
    ``labelwise.models.init.initialise_from`` reads: an official DINO checkpoint, this
    project's exports) instead of random weights, to continue pretraining on your own images;
    projection heads always start fresh. The init report goes to ``run_dir/init_report.json``.
    """

    moved_keys: ClassVar[dict[str, str]] = FLAT_SCHEDULE_KEYS

    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    method: Literal["dino", "moco", "dense_moco", "rotation"] = "dino"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", weight_decay=0.04, grad_clip=3.0))
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(steps=1000, lr=5e-4, schedule="cosine",
                                                                            min_lr=1e-6)])
    epochs: float | None = None
    weight_decay_end: float = 0.4
    teacher_momentum: float = 0.996
    teacher_momentum_end: float = 1.0
    export: Literal["teacher", "student"] = "teacher"
    init: str | None = None
    run_dir: str = "runs/pretrain"

    def validate(self) -> None:
        """Range checks the type system cannot express (errors name the dotted key)."""
        self.validate_run()
        if not self.data.images:
            raise ConfigError("data.images: at least one image folder is required (or --images DIR)")
        if self.data.max_side is not None and self.data.max_side < 16:
            raise ConfigError(f"data.max_side: must be >= 16 or null, got {self.data.max_side}")
        for key in ("batch_size",):
            if getattr(self.data, key) <= 0:
                raise ConfigError(f"data.{key}: must be > 0, got {getattr(self.data, key)}")
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.data.num_workers}")
        self.validate_schedule(warmup_below_steps=self.epochs is None)
        self.validate_single_stage("pretraining", "the crops are set in multicrop, the batch in data.batch_size")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs: must be > 0 or null, got {self.epochs}")
        if self.weight_decay_end < 0:
            raise ConfigError(f"weight_decay_end: must be >= 0, got {self.weight_decay_end}")
        for key in ("teacher_momentum", "teacher_momentum_end"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key}: must be in [0, 1], got {getattr(self, key)}")
        for key in ("checkpoint_every", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)}")
        self._validate_backbone()
        self._validate_method()

    def _validate_backbone(self) -> None:
        b = self.backbone
        if b.patch_size <= 0:
            raise ConfigError(f"backbone.patch_size: must be > 0, got {b.patch_size}")
        if b.num_registers < 0:
            raise ConfigError(f"backbone.num_registers: must be >= 0, got {b.num_registers}")
        if not 0 <= b.drop_path < 1:
            raise ConfigError(f"backbone.drop_path: must be in [0, 1), got {b.drop_path}")
        reserved = {"arch", "patch_size", "num_registers", "drop_path", "mask_token"} & set(b.options)
        if b.kind == "vit" and reserved:
            raise ConfigError(f"backbone.options.{sorted(reserved)[0]}: set it as backbone.{sorted(reserved)[0]} "
                              "(mask_token is set by dino.ibot)")
        if b.kind == "unet" and "num_classes" in b.options:
            raise ConfigError("backbone.options.num_classes: not an encoder option (pretraining has no classes)")

    def _validate_method(self) -> None:
        d, m = self.dino, self.moco
        if self.method == "dino":
            for key in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers", "patch_out_dim"):
                if getattr(d, key) < 1:
                    raise ConfigError(f"dino.{key}: must be >= 1, got {getattr(d, key)}")
            for key in ("student_temp", "warmup_teacher_temp", "teacher_temp", "patch_teacher_temp"):
                if getattr(d, key) <= 0:
                    raise ConfigError(f"dino.{key}: must be > 0, got {getattr(d, key)}")
            if not 0 <= d.center_momentum < 1:
                raise ConfigError(f"dino.center_momentum: must be in [0, 1), got {d.center_momentum}")
            if d.warmup_teacher_temp_steps < 0 or d.freeze_last_layer_steps < 0:
                raise ConfigError("dino.warmup_teacher_temp_steps / dino.freeze_last_layer_steps: must be >= 0")
            if d.ibot and self.backbone.kind != "vit":
                raise ConfigError("dino.ibot: masked-patch distillation needs backbone.kind vit (a mask token)")
            if d.ibot and d.shared_head and d.patch_out_dim != d.out_dim:
                raise ConfigError("dino.patch_out_dim: must equal dino.out_dim when dino.shared_head is true")
            if not 0 <= d.mask_prob <= 1:
                raise ConfigError(f"dino.mask_prob: must be in [0, 1], got {d.mask_prob}")
            if not 0 < d.mask_ratio[0] <= d.mask_ratio[1] < 1:
                raise ConfigError(f"dino.mask_ratio: need 0 < lo <= hi < 1, got {list(d.mask_ratio)}")
            if d.ibot_weight < 0:
                raise ConfigError(f"dino.ibot_weight: must be >= 0, got {d.ibot_weight}")
        if self.method in ("moco", "dense_moco"):
            if m.dim < 1 or m.hidden_dim < 1:
                raise ConfigError("moco.dim / moco.hidden_dim: must be >= 1")
            if m.temperature <= 0:
                raise ConfigError(f"moco.temperature: must be > 0, got {m.temperature}")
            if m.queue_size < 0:
                raise ConfigError(f"moco.queue_size: must be >= 0 (0 = in-batch negatives), got {m.queue_size}")
            if not 0 <= m.dense_weight <= 1:
                raise ConfigError(f"moco.dense_weight: must be in [0, 1], got {m.dense_weight}")
        if self.method == "rotation" and self.rotation.hidden_dim < 0:
            raise ConfigError(f"rotation.hidden_dim: must be >= 0, got {self.rotation.hidden_dim}")
