"""The key of a feature cache: a SHA-256 over the backbone weights and configuration, the
preprocessing, the precision, the attention maps asked for, whether labels are stored, and the
dataset's identity (class, length, plain public attributes) and sample names."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from labelwise.data.identity import dataset_identity, dataset_names
from labelwise.errors import ConfigError
from labelwise.features.preprocess import normalise_preprocessing

__all__ = ["FORMAT", "attention_block_indices", "cache_key", "dataset_identity", "dataset_names", "weights_digest"]

FORMAT = "labelwise-features/1"


def _backbone_description(backbone: nn.Module) -> dict[str, Any]:
    description: dict[str, Any] = {"class": f"{type(backbone).__module__}.{type(backbone).__qualname__}"}
    config = getattr(backbone, "config", None)
    if hasattr(config, "to_dict"):
        description["config"] = config.to_dict()
    elif callable(config):
        try:
            description["config"] = config()
        except TypeError:
            pass
    return json.loads(json.dumps(description, default=str))


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor of ``module.state_dict()`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(backbone: nn.Module, dataset: Dataset, preprocessing: Mapping[str, Any] | None = None, *,
              precision: str = "bf16", attention_blocks: Sequence[int] = (),
              attention_kinds: Sequence[str] = ("cls",), labels: bool = True,
              names: Sequence[str] | None = None, storage: str = "float16") -> tuple[str, dict[str, Any]]:
    """``(key, description)`` of the cache ``extract_features`` would write for these inputs."""
    names = list(names) if names is not None else dataset_names(dataset)
    description = {
        "format": FORMAT,
        "backbone": _backbone_description(backbone),
        "weights_sha256": weights_digest(backbone),
        "preprocessing": normalise_preprocessing(preprocessing),
        "precision": precision,
        **({"storage": storage} if storage != "float16" else {}),  # float16 keys stay what they were
        "attention": {"blocks": attention_block_indices(backbone, attention_blocks),
                      "kinds": sorted(attention_kinds) if attention_blocks else []},
        "labels": bool(labels),
        "dataset": dataset_identity(dataset),
        "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
    return key, description


def attention_block_indices(backbone: nn.Module, blocks: Sequence[int]) -> list[int]:
    """Block indices made non-negative using the backbone's depth (when it has ``blocks``)."""
    depth = getattr(backbone, "depth", None)
    if depth is None and hasattr(backbone, "blocks"):
        depth = len(backbone.blocks)  # type: ignore[arg-type]
    result = []
    for block in blocks:
        if isinstance(block, bool) or not isinstance(block, int):
            raise ConfigError(f"attention_blocks: block indices must be ints, got {block!r}")
        if depth is not None:
            if not -depth <= block < depth:
                raise ConfigError(f"attention_blocks: block {block} out of range for a backbone of depth {depth}")
            block %= depth
        result.append(block)
    return sorted(set(result))
