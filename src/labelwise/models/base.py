"""The base class of every labelwise segmentation model, and the model registry.

A model takes images ``[B, in_channels, H, W]`` (float, RGB in [0, 1], unnormalised) of any
size and returns logits ``[B, num_classes, H, W]``. The base class does the common part:

1. check the input (4-D, ``in_channels`` channels, floating point) and raise ``ValueError``
   with the expected and actual shape otherwise;
2. normalise with the ImageNet mean/std (non-persistent buffers: checkpoints do not carry them);
3. pad bottom/right to a multiple of ``output_stride`` (reflect; replicate when the image is
   smaller than the padding);
4. run ``_encode`` (-> list of feature maps) and ``_decode`` (-> logits) of the subclass;
5. crop the logits back to ``H x W``.

``encode`` / ``decode`` are public so that methods can perturb encoder features (UniMatch's
channel dropout): ``model.decode([drop(f) for f in model.encode(x)], size=x.shape[-2:])``.

The registry (``register_model``, ``create``, ``available_models``) lives here rather than in
``models/__init__.py`` so that model files can import it without a circular import;
``labelwise.models`` re-exports it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Iterator, NamedTuple, Sequence, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import ConfigError
from labelwise.models.encoders import batchnorm_to_eval

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeepSupervisionOutput(NamedTuple):
    """Training-mode output of deeply supervised models (U²-Net).

    logits: the fused logits ``[B, C, H, W]`` (what eval mode returns alone).
    side_logits: one ``[B, C, H, W]`` tensor per side output, finest stage first.
    """

    logits: Tensor
    side_logits: list[Tensor]


ModelOutput = Union[Tensor, DeepSupervisionOutput]


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad ``x [B, C, H, W]`` at the bottom and right so that H and W are multiples of
    ``multiple``. Reflect padding, or replicate where the image is too small to reflect."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def crop_output(output: ModelOutput, size: Sequence[int]) -> ModelOutput:
    """Crop logits ``[..., H', W']`` (or every tensor of a ``DeepSupervisionOutput``) to the
    top-left ``size = (H, W)``."""
    height, width = int(size[0]), int(size[1])
    if isinstance(output, DeepSupervisionOutput):
        return DeepSupervisionOutput(
            output.logits[..., :height, :width],
            [side[..., :height, :width] for side in output.side_logits],
        )
    return output[..., :height, :width]


def check_int(option: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"option {option!r} must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(option: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ConfigError``."""
    if value not in choices:
        raise ConfigError(f"option {option!r} must be one of {list(choices)}, got {value!r}")
    return value


def check_probability(option: str, value: Any) -> float:
    """Return ``float(value)`` if it lies in [0, 1), else raise ``ConfigError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"option {option!r} must be a number in [0, 1), got {value!r}")
    return float(value)


class SegmentationModel(nn.Module):
    """Base class: input checks, normalisation, padding to ``output_stride``, cropping.

    Subclasses call ``super().__init__(num_classes, in_channels, **options)`` with every other
    constructor argument as a keyword (that is what ``config()`` returns), set
    ``output_stride``, ``encoder`` (the module ``encoder_parameters`` names) and implement
    ``_encode(x) -> list[Tensor]`` and ``_decode(features) -> logits`` on normalised images
    already padded to ``output_stride``.
    """

    model_name: ClassVar[str] = ""
    encoder: nn.Module

    def __init__(self, num_classes: int, in_channels: int = 3, **options: Any) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.in_channels = check_int("in_channels", in_channels, 1)
        self.output_stride = 1
        self._options = dict(options)
        if in_channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:  # no color statistics for other channel counts: use the grey ImageNet values
            mean = (sum(IMAGENET_MEAN) / 3,) * in_channels
            std = (sum(IMAGENET_STD) / 3,) * in_channels
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    # -- input handling -------------------------------------------------------------------
    def check_input(self, images: Any) -> None:
        """Raise ``ValueError`` unless ``images`` is a float tensor ``[B, in_channels, H, W]``."""
        expected = f"images [B, {self.in_channels}, H, W] (floating point, values in [0, 1])"
        if not isinstance(images, Tensor):
            raise ValueError(f"{type(self).__name__} expected {expected}, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != self.in_channels or images.numel() == 0:
            raise ValueError(
                f"{type(self).__name__} expected {expected}, got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expected {expected}, got dtype {images.dtype} "
                "(convert with images.float() / 255 for uint8 images)"
            )

    def preprocess(self, images: Tensor) -> Tensor:
        """Check, normalise and pad ``images [B, C, H, W]`` to ``[B, C, H', W']`` with H', W'
        the next multiples of ``output_stride``."""
        self.check_input(images)
        x = (images - self.pixel_mean) / self.pixel_std
        return pad_to_multiple(x, self.output_stride)

    # -- forward ----------------------------------------------------------------------------
    def encode(self, images: Tensor) -> list[Tensor]:
        """Encoder feature maps of ``images [B, C, H, W]``, finest first; they cover the padded
        image ``[H', W']`` (see ``preprocess``)."""
        return self._encode(self.preprocess(images))

    def decode(self, features: list[Tensor], size: Sequence[int] | None = None) -> ModelOutput:
        """Logits ``[B, num_classes, H', W']`` from ``encode``'s features, cropped to
        ``size = (H, W)`` when given (a ``DeepSupervisionOutput`` for U²-Net in training)."""
        output = self._decode(features)
        return output if size is None else crop_output(output, size)

    def forward(self, images: Tensor) -> ModelOutput:
        """``images [B, C, H, W]`` in [0, 1] -> logits ``[B, num_classes, H, W]``."""
        return self.decode(self.encode(images), size=images.shape[-2:])

    def _encode(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def _decode(self, features: list[Tensor]) -> ModelOutput:
        raise NotImplementedError

    # -- freezing (transfer learning) -------------------------------------------------------
    def freeze_encoder(self) -> None:
        """Freeze the encoder: no gradients for its parameters and its BatchNorm statistics kept
        (its norm layers stay in eval mode through ``train()``), so it stays bit-identical."""
        for param in self.encoder.parameters():
            param.requires_grad_(False)
        self.freeze_encoder_bn()

    def freeze_encoder_bn(self) -> None:
        """Keep the encoder's BatchNorm running statistics fixed (eval-mode normalisation) while
        its weights still train: what small batches need (smp / MMSegmentation ``norm_eval``)."""
        self._encoder_bn_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "SegmentationModel":
        super().train(mode)
        if getattr(self, "_encoder_bn_frozen", False):
            batchnorm_to_eval(self.encoder)
        return self

    # -- parameters and configuration -------------------------------------------------------
    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of ``self.encoder`` (initialised from pretrained checkpoints)."""
        return self.encoder.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter not in ``self.encoder`` (decoder and heads)."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        return (p for p in self.parameters() if id(p) not in encoder_ids)

    def config(self) -> dict[str, Any]:
        """JSON-able dict ``{"name", "num_classes", "in_channels", **options}`` such that
        ``labelwise.models.create(**model.config())`` rebuilds this architecture exactly."""
        return {
            "name": self.model_name,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            **self._options,
        }


# -- registry -----------------------------------------------------------------------------
ModelFactory = Callable[..., SegmentationModel]
_F = TypeVar("_F", bound=Callable[..., Any])
_REGISTRY: dict[str, tuple[ModelFactory, dict[str, Any]]] = {}


def register_model(name: str, **fixed_options: Any) -> Callable[[_F], _F]:
    """Decorator registering a model class (or factory function) under ``name``.

    ``fixed_options`` are passed to every ``create(name, ...)`` call and cannot be changed
    there (e.g. ``register_model("u2net_small", variant="small")(U2Net)``). A class without its
    own ``model_name`` gets ``name`` as ``model_name`` (what ``config()`` reports).
    """

    def decorator(factory: _F) -> _F:
        previous = _REGISTRY.get(name)
        if previous is not None and _qualname(previous[0]) != _qualname(factory):
            raise ValueError(f"model name {name!r} is already registered by {_qualname(previous[0])}")
        _REGISTRY[name] = (factory, dict(fixed_options))
        if isinstance(factory, type) and not factory.__dict__.get("model_name"):
            factory.model_name = name  # type: ignore[attr-defined]
        return factory

    return decorator


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def available_models() -> list[str]:
    """Sorted names accepted by ``create``."""
    return sorted(_REGISTRY)


def model_options(name: str) -> dict[str, Any]:
    """The options ``create(name, ...)`` accepts, with their defaults (fixed ones excluded)."""
    factory, fixed = _lookup(name)
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.name not in ("num_classes", *fixed)
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _lookup(name: str) -> tuple[ModelFactory, dict[str, Any]]:
    if name not in _REGISTRY:
        raise ConfigError(
            f"model.name: unknown model {name!r}; available models: {', '.join(available_models())}"
        )
    return _REGISTRY[name]


def create(name: str, num_classes: int, **options: Any) -> SegmentationModel:
    """Build the registered model ``name`` with ``num_classes`` outputs.

    Raises ``ConfigError`` for an unknown name (listing the available ones), an option the
    model's constructor does not take (naming the option and the model) or a bad value.
    """
    factory, fixed = _lookup(name)
    parameters = inspect.signature(factory).parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    allowed = model_options(name)
    for key, value in options.items():
        if key in fixed:
            if value != fixed[key]:
                raise ConfigError(
                    f"model {name!r} fixes option {key!r} = {fixed[key]!r}, got {value!r}"
                )
        elif key not in allowed and not takes_any:
            raise ConfigError(
                f"unknown option {key!r} for model {name!r}; "
                f"its options are: {', '.join(allowed) or '(none)'}"
            )
    return factory(num_classes=num_classes, **{**fixed, **options})
