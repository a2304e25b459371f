"""Pretrained CNN encoder weights: where the files are, how their inputs must look, strict loading.

A weight file comes with an *input convention* (:class:`InputConvention`): the normalisation its
network was trained with and the padding rule of its strided convolutions. The convention
travels with the weights so the user never has to know it:

============================  ===========================  =============  ==================
``encoder_weights``           file                         input          padding
============================  ===========================  =============  ==================
``imagenet``                  ``mobilenet_v2_imagenet.pth``  ``[-1, 1]``    TF 'SAME'
``imagenet_torchvision``      ``mobilenet_v2-b0353104.pth``  ImageNet mean/std  symmetric
============================  ===========================  =============  ==================

The long names ``mobilenet_v2_imagenet`` / ``mobilenet_v2_torchvision`` mean the same files
(for ``--init``). A name is looked up, in this order, in ``$LABELWISE_WEIGHTS``, in
``../shared/weights`` beside the source checkout or the working directory (when present), then in
the user cache
(``$LABELWISE_CACHE`` or ``~/.cache/labelwise``); torchvision's file is downloaded into the cache
when it is nowhere and the network allows. Offline, the error lists where to put which file.

A file given by path takes the convention of the known file of the same name; for any other
file (e.g. a renamed copy) the model option ``encoder_convention`` says it (``tf`` or
``torchvision``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor, nn

from labelwise.errors import CheckpointError, ConfigError

#: Environment variable naming a folder of pretrained weight files, searched first.
WEIGHTS_ENV = "LABELWISE_WEIGHTS"
#: ``../shared/weights`` seen from the project root (the source checkout).
SHARED_WEIGHTS_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "weights"


@dataclass(frozen=True)
class InputConvention:
    """How images must be prepared for a set of weights.

    ``mean`` / ``std``: per-channel normalisation of RGB in [0, 1] (``(x - mean) / std``);
    ``padding_rule``: ``"tf_same"`` or ``"symmetric"`` (``labelwise.models.mobilenet_v2``).
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    padding_rule: str


CONVENTIONS: dict[str, InputConvention] = {
    "tf": InputConvention("tf", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "tf_same"),
    "torchvision": InputConvention("torchvision", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "symmetric"),
}


@dataclass(frozen=True)
class NamedWeights:
    """A known weight file: its encoder, file name, convention, (optional) download URL, and
    whether its BatchNorm layers are identities with the statistics folded into the convolutions
    (``folded_batchnorm``: batch statistics in training would then change what the network
    computes, so fine-tuning keeps them frozen by default)."""

    encoder: str
    file_name: str
    convention: str
    url: str | None = None
    folded_batchnorm: bool = False


NAMED_WEIGHTS: dict[str, NamedWeights] = {
    "mobilenet_v2_imagenet": NamedWeights("mobilenet_v2", "mobilenet_v2_imagenet.pth", "tf",
                                          folded_batchnorm=True),
    "mobilenet_v2_torchvision": NamedWeights(
        "mobilenet_v2", "mobilenet_v2-b0353104.pth", "torchvision",
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"),
}
#: Short ``encoder_weights`` values -> long names, per encoder.
SHORT_NAMES: dict[tuple[str, str], str] = {
    ("mobilenet_v2", "imagenet"): "mobilenet_v2_imagenet",
    ("mobilenet_v2", "imagenet_torchvision"): "mobilenet_v2_torchvision",
}


def search_dirs() -> list[Path]:
    """Folders searched for named weight files, in order (module docstring)."""
    from labelwise.models.vit_loading import cache_dir

    dirs = []
    if os.environ.get(WEIGHTS_ENV):
        dirs.append(Path(os.environ[WEIGHTS_ENV]).expanduser())
    for shared in (SHARED_WEIGHTS_DIR, Path.cwd().parent / "shared" / "weights"):
        if shared.is_dir() and shared.resolve() not in [d.resolve() for d in dirs]:
            dirs.append(shared)
    dirs.append(cache_dir())
    return dirs


def long_name(encoder: str, weights: str) -> str | None:
    """The ``NAMED_WEIGHTS`` key ``weights`` stands for with ``encoder`` (None: a path)."""
    if weights in NAMED_WEIGHTS:
        return weights
    return SHORT_NAMES.get((encoder, weights))


def is_weights_name(text: str) -> bool:
    """Whether ``text`` is a long weights name (``mobilenet_v2_imagenet`` ...)."""
    return text in NAMED_WEIGHTS


def resolve_weights(name: str) -> Path:
    """The file of a ``NAMED_WEIGHTS`` name (module docstring for the search order).

    Raises:
        CheckpointError: the file is in none of the folders and cannot be downloaded; the message
            names the file and the folders to put it in.
    """
    from labelwise.models.vit_loading import _first_line, cache_dir, download

    named = NAMED_WEIGHTS[name]
    dirs = search_dirs()
    for folder in dirs:
        candidate = folder / named.file_name
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in dirs)
    if named.url is None:
        raise CheckpointError(
            f"weights {name!r}: {named.file_name} is not in any of {where}; copy it into one of them "
            f"(or point ${WEIGHTS_ENV} at the folder holding it)")
    target = cache_dir() / named.file_name
    try:
        download(named.url, target)
    except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
        raise CheckpointError(
            f"weights {name!r}: {named.file_name} is not in any of {where} and could not be downloaded "
            f"({_first_line(exc)}); download {named.url} and place it in one of those folders") from exc
    return target


def convention_for(encoder: str, weights: str | None, convention: str = "auto") -> InputConvention:
    """The input convention of ``encoder_weights`` (``convention`` overrides unless ``"auto"``).

    No weights (random init): the convention of the encoder's default ImageNet file. A path:
    the convention of the known file of that name, else ``convention`` must be given.
    """
    if convention != "auto":
        if convention not in CONVENTIONS:
            raise ConfigError(f"option 'encoder_convention' must be one of {['auto', *CONVENTIONS]}, "
                              f"got {convention!r}")
        return CONVENTIONS[convention]
    if weights is None:
        weights = "imagenet"
    name = long_name(encoder, weights)
    if name is not None:
        return CONVENTIONS[NAMED_WEIGHTS[name].convention]
    file_name = Path(weights).name
    for named in NAMED_WEIGHTS.values():
        if named.encoder == encoder and named.file_name == file_name:
            return CONVENTIONS[named.convention]
    raise ConfigError(
        f"encoder_weights {weights!r}: unknown file, so its input convention is unknown; set option "
        f"'encoder_convention' to 'tf' ([-1, 1] input, TF 'SAME' padding) or 'torchvision' (ImageNet "
        "mean/std, symmetric padding)")


def known_weights(encoder: str, weights: str | None) -> NamedWeights | None:
    """The ``NamedWeights`` entry ``weights`` names (directly or by file name), or None."""
    if weights is None:
        return None
    name = long_name(encoder, weights)
    if name is not None:
        return NAMED_WEIGHTS[name]
    file_name = Path(weights).name
    return next((w for w in NAMED_WEIGHTS.values() if w.encoder == encoder and w.file_name == file_name), None)


def weights_path(encoder: str, weights: str) -> Path:
    """The file ``encoder_weights`` names: a known name resolved, or the path itself."""
    name = long_name(encoder, weights)
    if name is not None:
        if NAMED_WEIGHTS[name].encoder != encoder:
            raise ConfigError(f"encoder_weights {weights!r} are {NAMED_WEIGHTS[name].encoder} weights, "
                              f"not {encoder}")
        return resolve_weights(name)
    path = Path(weights).expanduser()
    if not path.is_file():
        known = sorted({short for (enc, short) in SHORT_NAMES if enc == encoder} |
                       {n for n, w in NAMED_WEIGHTS.items() if w.encoder == encoder})
        raise CheckpointError(f"encoder_weights {weights!r}: no such file, and not one of {known}")
    return path


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.pth`` (``weights_only=True``) or ``.safetensors`` state dict, with a
    ``state_dict`` / ``model`` wrapper and ``module.`` / ``backbone.`` prefixes removed."""
    from labelwise.models.vit_loading import _strip_prefixes, read_checkpoint, unwrap_checkpoint

    raw, _ = read_checkpoint(path)
    return {k: v for k, v in _strip_prefixes(unwrap_checkpoint(raw)).items() if isinstance(v, Tensor)}


def load_strict(module: nn.Module, state: Mapping[str, Any], source: str | Path,
                allowed_extra: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module`` requiring every name and shape to match.

    Keys starting with one of ``allowed_extra`` (e.g. ``"classifier."`` when loading a classifier
    checkpoint into an encoder) are dropped. Raises :class:`CheckpointError` naming ``source``
    and the first missing, unexpected or mis-shaped key.
    """
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(allowed_extra)}
    for key in sorted(own):
        if key not in state:
            raise CheckpointError(f"{source}: key {key!r} is missing ({len(set(own) - set(state))} of "
                                  f"{len(own)} model keys missing; is this a checkpoint of this network?)")
    for key in sorted(state):
        if key not in own:
            raise CheckpointError(f"{source}: unexpected key {key!r} (not in the model)")
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, the model "
                                  f"expects {tuple(own[key].shape)}")
    module.load_state_dict(dict(state), strict=True)


__all__ = [
    "CONVENTIONS",
    "NAMED_WEIGHTS",
    "SHARED_WEIGHTS_DIR",
    "WEIGHTS_ENV",
    "InputConvention",
    "NamedWeights",
    "convention_for",
    "is_weights_name",
    "known_weights",
    "load_strict",
    "read_weights",
    "resolve_weights",
    "search_dirs",
    "weights_path",
]
