"""Pretrained CNN encoders for the segmentation models (smp's ``encoder_name`` / ``encoder_weights``).

    encoder, convention = build_encoder("mobilenet_v2", weights="imagenet", output_stride=16)
    features = encoder(normalised)   # 5 maps at strides 2, 4, 8, 16, 16 (output_stride 16)

``build_encoder`` creates the encoder with the padding rule of the weights' input convention and
loads the weights strictly (``labelwise.models.pretrained``); the caller normalises its input with
``convention.mean`` / ``convention.std``. Inside :func:`skip_pretrained_weights` no file is read:
``labelwise.models.export.load_model`` rebuilds exported models that way, since their own weights
replace the pretrained ones at once (and the pretrained file need not be on the machine).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn

from labelwise.errors import ConfigError
from labelwise.models.mobilenet_v2 import MobileNetV2Encoder
from labelwise.models.pretrained import InputConvention, convention_for, load_strict, read_weights, weights_path

ENCODERS = ("mobilenet_v2",)
_LOAD_PRETRAINED: contextvars.ContextVar[bool] = contextvars.ContextVar("labelwise_load_pretrained", default=True)


@contextlib.contextmanager
def skip_pretrained_weights() -> Iterator[None]:
    """Within this block, models are built with their pretrained conventions but without reading
    the weight files (their weights are about to be overwritten)."""
    token = _LOAD_PRETRAINED.set(False)
    try:
        yield
    finally:
        _LOAD_PRETRAINED.reset(token)


def batchnorm_to_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in eval mode (running statistics used and kept),
    whatever the mode of the rest: what small batches and the folded-BatchNorm ``imagenet``
    weights need while the weights train (smp / MMSegmentation ``norm_eval``)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def extend_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-conv kernel ``[out, 3, k, k]`` for ``in_channels`` inputs: the RGB kernels kept,
    each extra channel initialised with the mean RGB kernel (fewer channels: the first ones)."""
    if in_channels <= weight.shape[1]:
        return weight[:, :in_channels].clone()
    extra = weight.mean(dim=1, keepdim=True).expand(-1, in_channels - weight.shape[1], -1, -1)
    return torch.cat([weight, extra], dim=1)


def build_encoder(name: str, weights: str | None = None, convention: str = "auto", output_stride: int = 32,
                  in_channels: int = 3) -> tuple[nn.Module, InputConvention]:
    """The encoder ``name`` (``ENCODERS``) and the input convention of its weights.

    Args:
        name: encoder name.
        weights: ``None`` (random init), a short name (``imagenet``, ``imagenet_torchvision``), a long
            name (``mobilenet_v2_imagenet``) or a weights file (torchvision key layout).
        convention: ``auto`` (from the weights) or ``tf`` / ``torchvision``.
        output_stride: 32, 16 or 8 (dilation replaces the last strides).
        in_channels: image channels; a pretrained first conv is extended (module docstring of
            ``extend_input_channels``).

    Raises:
        ConfigError: unknown encoder / convention / output stride.
        CheckpointError: the weights file is missing or does not match (naming the file and key).
    """
    if name not in ENCODERS:
        raise ConfigError(f"option 'encoder' must be one of {list(ENCODERS)}, got {name!r}")
    if output_stride not in (8, 16, 32):
        raise ConfigError(f"option 'encoder_output_stride' must be 8, 16 or 32, got {output_stride!r}")
    input_convention = convention_for(name, weights, convention)
    encoder = MobileNetV2Encoder(input_convention.padding_rule, output_stride, in_channels)  # type: ignore[arg-type]
    if weights is not None and _LOAD_PRETRAINED.get():
        path = weights_path(name, weights)
        state = read_weights(path)
        first = "features.0.0.weight"
        if in_channels != 3 and first in state:
            state[first] = extend_input_channels(state[first], in_channels)
        load_strict(encoder, state, path, allowed_extra=("classifier.",))
    return encoder, input_convention


__all__ = ["ENCODERS", "build_encoder", "extend_input_channels", "skip_pretrained_weights"]
