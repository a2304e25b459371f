"""Typed configuration: dataclasses loaded from YAML with ``key.sub=value`` overrides.

Every key is checked at load time: an unknown key, a value of the wrong type or a value outside
its allowed choices raises :class:`~labelwise.errors.ConfigError` naming the dotted key, e.g.
``stages.0.lr: expected float, got 'fast'``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from labelwise.errors import ConfigError

T = TypeVar("T")
# a float in exponent notation without a dot, which YAML 1.1 leaves a string (1e-3, -2E5)
#: Largest magnitude of an integer setting: seeds, steps and sizes all fit a 32-bit int, and
#: larger values overflow the RNG seeding or allocate without bound.
MAX_CONFIG_INT = 2**31 - 1
#: Largest image side (pixels) of a size setting (resize, crops, synthetic images).
MAX_IMAGE_SIDE = 16384

_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


@dataclass
class AugmentConfig:
    """Augmentation settings; the defaults apply horizontal flips only.

    Attributes:
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rotate_degrees: rotation angle drawn uniformly in ``[-rotate_degrees, rotate_degrees]``.
        scale: zoom factor range ``(lo, hi)``, drawn log-uniformly; > 1 enlarges the content.
        crop_size: output ``(h, w)`` in pixels; ``None`` keeps the input size. The crop centre
            is drawn uniformly so that the crop stays inside the (scaled) image when it fits.
        brightness, contrast, saturation: factors drawn in ``[1 - v, 1 + v]``.
        hue: hue shift drawn in ``[-hue, hue]`` as a fraction of the full circle (<= 0.5).
    """

    hflip: float = 0.5
    vflip: float = 0.0
    rotate_degrees: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    crop_size: tuple[int, int] | None = None
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self) -> None:
        for key in ("hflip", "vflip"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{key}: a probability in [0, 1] is required, got {value}")
        for key in ("rotate_degrees", "brightness", "contrast", "saturation", "hue"):
            if getattr(self, key) < 0:
                raise ConfigError(f"augment.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("brightness", "contrast", "saturation"):
            if getattr(self, key) > 1.0:
                raise ConfigError(f"augment.{key}: must be <= 1 (factors in [1 - v, 1 + v]), got {getattr(self, key)}")
        if self.hue > 0.5:
            raise ConfigError(f"augment.hue: must be <= 0.5 (fraction of the hue circle), got {self.hue}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(f"augment.scale: need 0 < lo <= hi, got {self.scale}")
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        if self.crop_size is not None:
            if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
                raise ConfigError(f"augment.crop_size: need two positive ints (h, w), got {self.crop_size}")
            if max(self.crop_size) > MAX_IMAGE_SIDE:
                raise ConfigError(f"augment.crop_size: at most {MAX_IMAGE_SIDE} pixels a side, got {self.crop_size}")
            self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))

    @property
    def warps(self) -> bool:
        """Whether the geometry needs resampling (rotation, scale or crop), not just flips."""
        return self.rotate_degrees > 0 or self.scale != (1.0, 1.0) or self.crop_size is not None

    @property
    def jitters(self) -> bool:
        return self.brightness > 0 or self.contrast > 0 or self.saturation > 0 or self.hue > 0


@dataclass
class StageConfig:
    """One stage of a (possibly multi-stage) schedule: its own length, lr, resolution and augmentation.

    ``input_scale`` resizes loaded batches before augmentation (0.5 = train at half resolution).
    ``lr`` is the stage's peak learning rate; ``schedule`` decays it over the stage after
    ``warmup_steps`` of linear warm-up from 0.
    """

    steps: int = 200
    lr: float = 1e-3
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    warmup_steps: int = 0
    min_lr: float = 0.0
    poly_power: float = 0.9
    batch_size: int | None = None
    input_scale: float = 1.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class DataConfig:
    """Which dataset to train and evaluate on.

    ``dataset``: ``synthetic`` (embedded, generated from ``seed``), ``folder`` (``root/<split>/images``
    + ``labels``, class map from ``class_map`` or ``root/classes.json``), ``camvid`` (the
    ``../shared/data/camvid`` layout), ``aerial`` (color-coded tiles ``root/tileN/{images,masks}``)
    or ``isprs`` (the ISPRS Potsdam / Vaihingen files as distributed, :mod:`labelwise.data.isprs`:
    tiles by id such as ``"2_10"``, ``bands`` RGB / IRRG, the eroded ``noBoundary`` labels as
    evaluation masks when ``eval_eroded``).
    ``resize`` is (H, W) applied when loading whole images; aerial training samples random
    ``tile_crop`` crops on the fly, ``samples_per_epoch`` of them per epoch. ``train_list``: a
    list file (one sample name per line, ``labelwise.data.splits``) restricting the training
    split to the samples it names (a labeled subset); for aerial data choose ``train_tiles``.
    """

    dataset: Literal["synthetic", "folder", "camvid", "aerial", "isprs"] = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_list: str | None = None
    class_map: str | None = None
    resize: tuple[int, int] | None = None
    train_tiles: list[int | str] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    val_tiles: list[int | str] = field(default_factory=lambda: [6, 7])
    bands: Literal["RGB", "IRRG", "RGBIR"] | None = None
    eval_eroded: bool = True
    tile_crop: int = 512
    samples_per_epoch: int = 512
    batch_size: int = 8
    num_workers: int = 0
    on_error: Literal["raise", "skip"] = "raise"
    synthetic_train_images: int = 64
    synthetic_val_images: int = 16
    synthetic_size: tuple[int, int] = (96, 128)
    synthetic_classes: int = 5
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        for key in ("tile_crop", "samples_per_epoch", "batch_size", "synthetic_train_images", "synthetic_val_images",
                    "synthetic_classes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        for key in ("resize", "synthetic_size"):
            size = getattr(self, key)
            if size is not None and not all(1 <= side <= MAX_IMAGE_SIDE for side in size):
                raise ConfigError(f"data.{key}: need two sides in [1, {MAX_IMAGE_SIDE}] pixels (H, W), got {size}")
        if self.tile_crop > MAX_IMAGE_SIDE:
            raise ConfigError(f"data.tile_crop: at most {MAX_IMAGE_SIDE} pixels, got {self.tile_crop}")


@dataclass
class ModelConfig:
    """Model name from ``labelwise.models.available_models()`` and its constructor options.

    ``init``: pretrained weights for the encoder, loaded before training starts (not on resume:
    the checkpoint wins): a labelwise model folder, a pretraining run folder (or its weights file),
    a ViT checkpoint or a named CNN weights file such as ``mobilenet_v2_imagenet`` (see
    ``labelwise.models.init``). ImageNet encoders are usually chosen in ``options``
    (``encoder: mobilenet_v2``, ``encoder_weights: imagenet``).

    Transfer-learning settings (as segmentation_models.pytorch / MMSegmentation users set them):
    ``freeze_encoder`` trains the decoder only (the encoder, BatchNorm statistics included, stays
    bit-identical); ``freeze_encoder_bn`` keeps the encoder's BatchNorm statistics fixed while its
    weights train (small batches); ``None`` = on exactly when the encoder starts from weights
    with folded BatchNorm (the TF-converted ``imagenet`` MobileNetV2); ``encoder_lr_scale``
    multiplies the learning rate of the encoder's parameters (e.g. 0.1).
    """

    name: str = "unet"
    options: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    freeze_encoder: bool = False
    freeze_encoder_bn: bool | None = None
    encoder_lr_scale: float = 1.0


@dataclass
class LossTerm:
    """One weighted term of the training loss: ``ce`` (cross-entropy), ``dice`` (soft Dice),
    ``focal`` or ``lovasz`` (Lovász-softmax)."""

    name: str = "ce"
    weight: float = 1.0


@dataclass
class LossConfig:
    """Weighted sum of loss terms; ``class_weights``: ``none``, ``balanced`` (from the training
    labels' class frequencies, see ``balance_method``) or an explicit list, one per class.
    ``context_weight``: for ``wide_context`` models, the weight of the auxiliary loss on the
    context's labels (the same terms), decaying as ``(1 - step / steps) ** 2`` (WiCoNet)."""

    terms: list[LossTerm] = field(default_factory=lambda: [LossTerm("ce", 1.0)])
    class_weights: Union[Literal["none", "balanced"], list[float]] = "none"
    balance_method: Literal["inverse_sqrt", "inverse", "median_frequency", "effective_number"] = "inverse_sqrt"
    context_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.context_weight < 0:
            raise ConfigError(f"loss.context_weight: must be >= 0, got {self.context_weight}")


@dataclass
class OptimConfig:
    """Optimiser: AdamW (``betas``, ``weight_decay``) or SGD (``momentum``, ``nesterov``);
    ``grad_clip`` is the max global gradient L2 norm (None = off)."""

    name: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    nesterov: bool = False
    grad_clip: float | None = None


@dataclass
class EvalConfig:
    """Evaluation: ``window`` enables sliding-window inference with that square window in pixels
    (None = whole image at once), ``overlap`` is the window overlap fraction; ``every`` runs a
    validation pass every N steps (0 = only at the end); ``input_scale`` resizes images before the
    model and logits back to full resolution; ``flip`` averages the logits of the image and its
    horizontal mirror (test-time augmentation, twice the inference cost)."""

    window: int | None = None
    overlap: float = 0.5
    batch_size: int = 4
    every: int = 0
    input_scale: float = 1.0
    flip: bool = False


@dataclass
class RunConfig:
    """Where and how a training run executes: the keys every training config shares (top level
    of its YAML). ``checkpoint_every`` / ``log_every`` are in steps; ``keep_checkpoints`` is how
    many complete checkpoints stay on disk."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"
    run_dir: str = "runs/run"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True

    def validate_run(self) -> None:
        if self.checkpoint_every <= 0:
            raise ConfigError(f"checkpoint_every: must be > 0, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        if self.log_every <= 0:
            raise ConfigError(f"log_every: must be > 0, got {self.log_every}")


@dataclass
class ScheduleConfig:
    """The optimiser and the training stages (each with its length, learning-rate schedule,
    resolution and augmentation)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def validate_schedule(self, warmup_below_steps: bool = True) -> None:
        """Range checks of every stage; ``warmup_below_steps=False`` for regimes that clamp the
        warm-up to the stage length themselves."""
        if not self.stages:
            raise ConfigError("stages: at least one stage is required")
        if self.optim.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be >= 0, got {self.optim.weight_decay}")
        if self.optim.grad_clip is not None and self.optim.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be >= 0 or null, got {self.optim.grad_clip}")
        for i, stage in enumerate(self.stages):
            if stage.steps <= 0:
                raise ConfigError(f"stages.{i}.steps: must be > 0, got {stage.steps}")
            if stage.lr <= 0:
                raise ConfigError(f"stages.{i}.lr: must be > 0, got {stage.lr}")
            if not 0 <= stage.min_lr <= stage.lr:
                raise ConfigError(f"stages.{i}.min_lr: must be in [0, lr], got {stage.min_lr}")
            too_long = warmup_below_steps and stage.warmup_steps and stage.warmup_steps >= stage.steps
            if stage.warmup_steps < 0 or too_long:
                raise ConfigError(f"stages.{i}.warmup_steps: must be in [0, steps), got {stage.warmup_steps}")
            if not 0 < stage.input_scale <= 4:
                raise ConfigError(f"stages.{i}.input_scale: must be in (0, 4], got {stage.input_scale}")
            if stage.batch_size is not None and stage.batch_size <= 0:
                raise ConfigError(f"stages.{i}.batch_size: must be > 0")

    def validate_single_stage(self, regime: str, reads: str) -> None:
        """For a regime that trains one stage on inputs it prepares itself: exactly one stage,
        and none of the stage keys it does not read (``reads`` says where those are set)."""
        if len(self.stages) != 1:
            raise ConfigError(f"stages: {regime} trains in one stage, got {len(self.stages)} stages")
        stage, default = self.stages[0], StageConfig()
        for key in ("batch_size", "input_scale", "augment"):
            if getattr(stage, key) != getattr(default, key):
                raise ConfigError(f"stages.0.{key}: not read by {regime} ({reads}); remove it")


#: Keys of the earlier flat schedule layout (``steps: 1000`` and ``lr: 5e-4`` at the top level)
#: and where they live now; configs whose class lists them in ``moved_keys`` still load them.
FLAT_SCHEDULE_KEYS = {"steps": "stages.0.steps", "lr": "stages.0.lr", "min_lr": "stages.0.min_lr",
                      "warmup_steps": "stages.0.warmup_steps", "weight_decay": "optim.weight_decay",
                      "grad_clip": "optim.grad_clip"}


@dataclass
class TrainConfig(RunConfig, ScheduleConfig):
    """Everything a supervised training run needs: the run keys (:class:`RunConfig`), the
    schedule (:class:`ScheduleConfig`) and its own sections."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    channels_last: bool = True
    run_dir: str = "runs/train"

    def validate(self) -> None:
        """Range checks the type system cannot express."""
        self.validate_schedule()
        self.validate_run()
        if self.data.batch_size <= 0:
            raise ConfigError(f"data.batch_size: must be > 0, got {self.data.batch_size}")
        if not self.model.encoder_lr_scale > 0:
            raise ConfigError(f"model.encoder_lr_scale: must be > 0, got {self.model.encoder_lr_scale}")
        if self.data.dataset != "synthetic" and not self.data.root:
            raise ConfigError(f"data.root: required for dataset {self.data.dataset!r}")
        if not 0 <= self.eval.overlap < 1:
            raise ConfigError(f"eval.overlap: must be in [0, 1), got {self.eval.overlap}")


# ---------------------------------------------------------------------------------------------
# Generic dataclass <-> plain data conversion with validation


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and convert lists/dicts into dataclasses/tuples."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {list(get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values ({_type_name(tp)}), got {value!r}")
        return tuple(_convert(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_CONFIG_INT:
                raise ConfigError(f"{key}: {value} is out of range (at most {MAX_CONFIG_INT} in magnitude)")
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
                # YAML 1.1 (PyYAML) reads 1e-3 (no dot) as a string; every user means the number
                number = float(value)
        except OverflowError:
            number = math.inf
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys and bad types."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (valid keys of {prefix.rstrip('.') or cls.__name__}: {sorted(names)})"
        )
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if not prefix or str(exc).startswith(prefix):  # already names the full key
            raise
        raise ConfigError(f"{prefix.rstrip('.')}: {exc}") from exc


def to_dict(config: Any) -> Any:
    """Dataclass tree → plain YAML/JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML.

    List items are addressed by index (``stages.1.lr=0.01``); a new stage index one past the end
    appends a copy of the previous stage. A whole list of mappings (``stages=[{steps: 300}]``)
    merges each item onto the current first one, as a YAML file's list does, so keys it leaves
    out keep the config's defaults (not the bare dataclass's).
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. optim.name=sgd")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{dotted}: cannot parse value {raw!r}: {exc}") from exc
    parts = dotted.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
        elif isinstance(node, dict):
            if part not in node:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{where}: is not a section, cannot set {dotted}")
    last = parts[-1]
    if isinstance(node, list):
        index = _list_index(node, last, dotted)
        if index == len(node):
            node.append(value)
        else:
            node[index] = value
    elif isinstance(node, dict):
        current = node.get(last)
        if isinstance(value, list) and isinstance(current, list) and current and all(isinstance(c, dict)
                                                                                     for c in current):
            value = _merge(current, value)  # a list of stages / terms: each item over the default one, as in YAML
        node[last] = value
    else:
        raise ConfigError(f"{dotted}: parent is not a section")


def _list_index(node: list, part: str, where: str) -> int:
    try:
        index = int(part)
    except ValueError as exc:
        raise ConfigError(f"{where}: list items are addressed by index, got {part!r}") from exc
    if not 0 <= index <= len(node):
        raise ConfigError(f"{where}: index {index} out of range (list has {len(node)} items)")
    return index


def _list_item(node: list, part: str, where: str) -> Any:
    index = _list_index(node, part, where)
    if index == len(node):
        node.append(dict(node[-1]) if node and isinstance(node[-1], dict) else {})
    return node[index]


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of YAML file ``path``; ``ConfigError`` naming the file otherwise."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_bytes().decode("utf-8-sig")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "save the config as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: not a usable config (nested too deeply)") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load dataclass ``cls`` from YAML file ``path`` (defaults where absent) plus overrides.

    A ``ConfigError`` about a key the file sets (and the overrides do not) names the file too."""
    loaded = read_yaml_mapping(path) if path is not None else {}
    try:
        return config_from_mapping(cls, loaded, overrides)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0].strip()
        overridden = {o.split("=", 1)[0].strip() for o in overrides}
        if path is None or key in overridden or not _sets_key(loaded, key.split(".")):
            raise
        raise ConfigError(f"{path}: {exc}") from exc


def _sets_key(mapping: Any, parts: list[str]) -> bool:
    """Whether the YAML ``mapping`` holds the dotted key ``parts`` (list items by index)."""
    node = mapping
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def config_from_mapping(cls: type[T], loaded: dict[str, Any], overrides: Sequence[str] = ()) -> T:
    """Dataclass ``cls`` from the defaults, a mapping of keys (as read from YAML) and overrides.

    Keys the class lists in ``moved_keys`` (a layout of an earlier version) are read at their new
    place, with a ``FutureWarning`` naming both.
    """
    moved: dict[str, str] = getattr(cls, "moved_keys", {})
    if moved:
        loaded = _move_keys(loaded, moved)
        overrides = [_move_override(override, moved) for override in overrides]
    data: dict[str, Any] = to_dict(cls())
    _check_keys(cls, loaded, "")
    data = _merge(data, loaded)
    for override in overrides:
        apply_override(data, override)
    config = from_dict(cls, data)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def _warn_moved(key: str, target: str) -> None:
    warnings.warn(f"config key {key!r} moved to {target!r} (read there); write it as {target}", FutureWarning,
                  stacklevel=5)


def _move_keys(loaded: dict[str, Any], moved: dict[str, str]) -> dict[str, Any]:
    """``loaded`` with each top-level key of ``moved`` put at its new dotted place (``stages.0.x``
    lands in the first stage, created if the mapping has none); a null value (e.g. ``steps: null``
    beside ``epochs``) is dropped. Both places given is an error naming them."""
    result = dict(loaded)
    for key, target in moved.items():
        if key not in result:
            continue
        value = result.pop(key)
        _warn_moved(key, target)
        if value is None:
            continue
        section, *rest = target.split(".")
        if section == "stages":
            stages = [dict(stage) if isinstance(stage, dict) else stage for stage in result.get("stages") or [{}]]
            node, name = stages[int(rest[0])], rest[1]
            result["stages"] = stages
        else:
            node, name = dict(result.get(section) or {}), rest[0]
            result[section] = node
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: moved to {target}, but {'.'.join([section, *rest[:-1]])} is not a mapping")
        if name in node:
            raise ConfigError(f"{key}: moved to {target}, which is also given; keep only {target}")
        node[name] = value
    return result


def _move_override(override: str, moved: dict[str, str]) -> str:
    key, sep, value = override.partition("=")
    if sep and key.strip() in moved:
        _warn_moved(key.strip(), moved[key.strip()])
        return f"{moved[key.strip()]}={value}"
    return override


@dataclass
class DataSection:
    """The ``data`` section alone: what evaluating a model on a dataset needs of any run config."""

    data: DataConfig = field(default_factory=DataConfig)


def load_data_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DataConfig:
    """The ``data`` section of any run's YAML config (train, semi, weak, unsupervised), other
    sections ignored, plus ``data.*`` overrides."""
    loaded = read_yaml_mapping(path) if path is not None else {}
    return config_from_mapping(DataSection, {"data": loaded.get("data") or {}}, overrides).data


def _check_keys(cls: Any, loaded: dict[str, Any], prefix: str) -> None:
    """Fail on unknown keys before merging, so the message points at the YAML key."""
    if not dataclasses.is_dataclass(cls):
        return
    hints = get_type_hints(cls)
    for key, value in loaded.items():
        if key not in hints:
            valid = sorted(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"{prefix}{key}: unknown key (valid keys: {valid})")
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
            _check_keys(hints[key], value, f"{prefix}{key}.")


def _merge(base: Any, update: Any) -> Any:
    """Deep-merge mappings; lists and scalars in ``update`` replace those in ``base``.

    A list of mappings (stages) merges item by item onto the default first item, so a YAML
    stage that sets only ``steps`` keeps the defaults of every other stage key.
    """
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(update, list) and base and all(isinstance(b, dict) for b in base):
        template = base[0]
        return [_merge(template, item) if isinstance(item, dict) else item for item in update]
    return update


def save_config(config: Any, path: str | Path) -> None:
    """Write ``config`` as YAML (atomically)."""
    from labelwise.io.atomic import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))


__all__ = [
    "AugmentConfig",
    "StageConfig",
    "DataConfig",
    "ModelConfig",
    "LossTerm",
    "LossConfig",
    "OptimConfig",
    "EvalConfig",
    "TrainConfig",
    "RunConfig",
    "ScheduleConfig",
    "FLAT_SCHEDULE_KEYS",
    "DataSection",
    "load_data_config",
    "config_from_mapping",
    "read_yaml_mapping",
    "load_config",
    "from_dict",
    "to_dict",
    "apply_override",
    "save_config",
]

_ = typing  # keep the import for get_type_hints on postponed annotations
