"""The registered ``"unet"``: the encoder-less U-Net, or the U-Net on a pretrained encoder.

``create("unet", num_classes=K)`` builds :class:`~labelwise.models.unet.UNet` (its options
``depth``, ``width`` ...); ``create("unet", encoder="mobilenet_v2", encoder_weights="imagenet",
num_classes=K)`` builds :class:`~labelwise.models.unet_encoder.EncoderUNet` (its options
``encoder_*``, ``decoder_channels``), as ``segmentation_models_pytorch.Unet(encoder_name=...)``.
Options of the other kind must keep their defaults; setting one is an error naming it.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, Sequence

from labelwise.errors import ConfigError
from labelwise.models.base import SegmentationModel, register_model
from labelwise.models.blocks import BlockType, PaddingMode
from labelwise.models.unet import UNet
from labelwise.models.unet_encoder import DEFAULT_DECODER_CHANNELS, EncoderUNet


def _own_options(cls: type) -> set[str]:
    return {name for name in inspect.signature(cls).parameters if name not in ("num_classes", "in_channels")}


@register_model("unet")
def unet(
    num_classes: int,
    in_channels: int = 3,
    encoder: str | None = None,
    encoder_weights: str | None = "imagenet",
    encoder_convention: str = "auto",
    encoder_output_stride: int = 32,
    decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
    depth: int = 4,
    width: int = 32,
    max_width: int | None = None,
    dropout: float = 0.0,
    padding_mode: PaddingMode = "zeros",
    block: BlockType = "conv",
    groups: int = 4,
    upsample: Literal["bilinear", "transpose"] = "bilinear",
) -> SegmentationModel:
    """A U-Net (module docstring). ``encoder=None``: the plain U-Net (the ``encoder_*`` options are
    then ignored at their defaults); with an encoder, ``encoder_weights=None`` is random init."""
    given = {key: value for key, value in locals().items() if key not in ("num_classes", "in_channels")}
    defaults = {p.name: p.default for p in inspect.signature(unet).parameters.values()}
    cls: type[SegmentationModel] = UNet if encoder is None else EncoderUNet
    own = _own_options(cls)
    for key, value in given.items():
        if key not in own and key != "encoder" and _differs(value, defaults[key]):
            kind = "the plain U-Net (no encoder)" if encoder is None else f"a U-Net on encoder {encoder!r}"
            raise ConfigError(f"option {key!r} does not apply to {kind}; its options are: {', '.join(sorted(own))}")
    return cls(num_classes=num_classes, in_channels=in_channels, **{k: v for k, v in given.items() if k in own})


def _differs(value: Any, default: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return list(value) != list(default)
    return value != default


__all__ = ["unet"]
