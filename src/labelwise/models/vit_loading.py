"""Load ViT backbones from official DINO / DINOv2, timm, Hugging Face and labelwise files.

    vit = load_vit("dino_deitsmall8_pretrain.pth")            # layout and architecture inferred
    vit = load_vit("dinov2_vits14")                           # a named backbone (cache / download)
    vit = load_vit("hf_dinov2/model.safetensors", drop_path=0.1)   # overrides of ViTConfig
    save_vit(vit, "weights/my_vit.safetensors")               # weights + ViTConfig in metadata

Nothing is unpickled beyond tensors: ``.pth`` / ``.pt`` / ``.bin`` files are read with
``torch.load(weights_only=True)`` (``argparse.Namespace`` is allowed too, for the ``args``
entry of DINO training checkpoints), everything else with safetensors.

Layouts (``detect_layout``; ``convert_state_dict`` maps each to the native key names of
``labelwise.models.vit``):

- ``"dino"``: official DINO backbone files (``dino_deitsmall16_pretrain.pth`` ...): already
  native; ``module.`` / ``backbone.`` prefixes are stripped.
- ``"dino_training"``: a DINO training checkpoint ``{"teacher": {...}, "student": {...}, ...}``
  (or a DINOv2 one, ``{"model": {"teacher.backbone.*": ...}}``); the ``teacher`` (default, as
  DINO's evaluation) or ``student`` weights, prefixes stripped, projection heads (``head.*``,
  ``dino_head.*``, ``ibot_head.*``) dropped.

Generic wrappers ``{"model": ...}`` / ``{"state_dict": ...}`` are unwrapped first.
- ``"dinov2"``: official DINOv2 files (``ls1.gamma``, ``mask_token``, optional
  ``register_tokens``); chunked blocks ``blocks.{chunk}.{i}.*`` are flattened. ViT-g/14 (SwiGLU
  ``mlp.w12`` / ``mlp.w3``) is not supported.
- ``"timm"``: ``timm.models.vision_transformer.VisionTransformer`` state dicts: ``head.*`` and
  ``attn_pool.*`` (classifier) dropped; ``reg_token`` -> ``register_tokens``; ``pos_embed``
  with one position per prefix token (``no_embed_class=False``: class and register positions)
  or none (``no_embed_class=True``, timm's DINOv2-with-registers ports): positions of the
  prefix tokens are folded into the tokens (exact, since they never move). ``fc_norm`` (global
  average-pool models, whose ``norm`` is an identity) becomes the final ``norm``, applied to
  every token: an approximation of the pooled model. Models without a class token, with
  ``norm_pre`` (CLIP) or q/k norms are not supported (their keys are reported as unexpected).
- ``"hf_vit"``: Hugging Face ``ViTModel`` (``embeddings.*``, ``encoder.layer.{i}.attention.
  attention.{query,key,value}``, ``layernorm_before/after``, ``intermediate.dense``,
  ``output.dense``, ``layernorm``), optionally under ``vit.``; ``pooler.*`` and ``classifier.*``
  dropped; separate q/k/v concatenated into ``qkv``. HF ViT uses LayerNorm eps 1e-12, ours
  1e-6: outputs agree to ~1e-6 relative.
- ``"hf_dinov2"``: Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``norm1``,
  ``layer_scale1.lambda1``, ``mlp.fc1`` ...), optionally under ``dinov2.``.
- ``"labelwise"``: files written by ``save_vit`` (native keys, ``ViTConfig`` JSON in the
  safetensors metadata).

The architecture is inferred from the tensors: ``embed_dim`` from ``cls_token``, ``depth`` from
the block count, ``patch_size`` / ``in_channels`` from the patch-embedding kernel, ``pos_grid``
from ``pos_embed``, registers, LayerScale, mask token, ``qkv_bias`` and ``mlp_ratio`` from the
keys present. ``num_heads`` cannot be read from weights: it comes from the file's metadata, a
Hugging Face ``config.json`` beside the file, the standard widths (192: 3, 384: 6, 768: 12,
1024: 16, 1280: 16, 1536: 24), or the caller (``num_heads=...``). Keyword overrides win.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from labelwise.errors import CheckpointError, ConfigError
from labelwise.io.atomic import atomic_path
from labelwise.models.vit import CUSTOM_ARCH, VIT_ARCHS, VisionTransformer, ViTConfig

LAYOUTS = ("dino", "dino_training", "dinov2", "timm", "hf_vit", "hf_dinov2", "labelwise")
#: Value of the ``format`` metadata key of the project's own backbone files.
METADATA_FORMAT = "labelwise_vit"
#: The project's own pretrained backbone (the name ``labelwise_default``), shipped inside the package.
DEFAULT_BACKBONE_PATH = Path(__file__).resolve().parents[1] / "weights" / "labelwise_vit.safetensors"
#: Environment variable overriding the download cache folder (default ``~/.cache/labelwise``).
CACHE_ENV = "LABELWISE_CACHE"

_DINO_URL = "https://dl.fbaipublicfiles.com/dino"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
#: Named official backbones: name -> (file name, download URL).
NAMED_BACKBONES: dict[str, tuple[str, str]] = {
    "dino_vits8": ("dino_deitsmall8_pretrain.pth",
                   f"{_DINO_URL}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
    "dino_vits16": ("dino_deitsmall16_pretrain.pth",
                    f"{_DINO_URL}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    "dino_vitb8": ("dino_vitbase8_pretrain.pth",
                   f"{_DINO_URL}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
    "dino_vitb16": ("dino_vitbase16_pretrain.pth",
                    f"{_DINO_URL}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    "dinov2_vits14": ("dinov2_vits14_pretrain.pth",
                      f"{_DINOV2_URL}/dinov2_vits14/dinov2_vits14_pretrain.pth"),
    "dinov2_vitb14": ("dinov2_vitb14_pretrain.pth",
                      f"{_DINOV2_URL}/dinov2_vitb14/dinov2_vitb14_pretrain.pth"),
    "dinov2_vitl14": ("dinov2_vitl14_pretrain.pth",
                      f"{_DINOV2_URL}/dinov2_vitl14/dinov2_vitl14_pretrain.pth"),
    "dinov2_vits14_reg": ("dinov2_vits14_reg4_pretrain.pth",
                          f"{_DINOV2_URL}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"),
    "dinov2_vitb14_reg": ("dinov2_vitb14_reg4_pretrain.pth",
                          f"{_DINOV2_URL}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"),
}
DEFAULT_NAME = "labelwise_default"

_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}
_PREFIXES = ("module.", "backbone.")
_TRAINING_HEADS = ("head.", "dino_head.", "ibot_head.")  # projection heads of DINO / DINOv2
#: Weight files looked for, in this order, when ``load_vit`` is given a folder (Hugging Face).
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "labelwise_vit.safetensors")


# ---------------------------------------------------------------------------------------------
# Reading files


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Raw contents of a checkpoint file: (mapping, safetensors metadata or ``{}``).

    Raises ``CheckpointError`` naming the file when it is missing, truncated or corrupt, or
    holds pickled objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot read safetensors file (truncated or corrupt?): {exc}") from exc
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{path}: refused to load: the file holds a pickled {refused.group(1)} object, and "
                "only tensors and plain containers are unpickled (weights_only=True)"
            ) from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated or corrupt?): "
            f"{detail.group(1).strip() if detail else _first_line(exc)}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {_first_line(exc)}") from exc
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(loaded).__name__}")
    return dict(loaded), {}


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch appends long advice)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return line.split(". ")[0] if len(line) > 160 else line


# ---------------------------------------------------------------------------------------------
# Layout detection and conversion


def _has(state: Mapping[str, Any], pattern: str) -> bool:
    regex = re.compile(pattern)
    return any(regex.search(key) for key in state)


def detect_layout(state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> str:
    """Name of the layout of ``state_dict`` (one of ``LAYOUTS``), ``CheckpointError`` if none.

    ``metadata``: safetensors metadata, which identifies ``"labelwise"`` files.
    """
    if metadata and metadata.get("format") == METADATA_FORMAT:
        return "labelwise"
    if any(isinstance(state_dict.get(key), Mapping) for key in ("teacher", "student")):
        return "dino_training"
    if any(key.startswith(("teacher.", "student.")) for key in state_dict):
        return "dino_training"  # DINOv2 training checkpoints: one flat dict
    if _has(state_dict, r"(^|\.)embeddings\.patch_embeddings\.projection\.weight$"):
        if _has(state_dict, r"\.layer_scale1\.lambda1$|\.mlp\.fc1\.weight$|\.norm1\.weight$"):
            return "hf_dinov2"
        return "hf_vit"
    state = _strip_prefixes(state_dict)
    if "patch_embed.proj.weight" not in state:
        sample = ", ".join(sorted(state_dict)[:6])
        raise CheckpointError(
            f"unknown checkpoint layout: no patch embedding key ('patch_embed.proj.weight' or "
            f"'embeddings.patch_embeddings.projection.weight'); first keys: {sample or '(none)'}"
        )
    if "reg_token" in state or "fc_norm.weight" in state or "head.weight" in state or not _pos_has_cls(state):
        return "timm"
    if "mask_token" in state or "register_tokens" in state or _has(state, r"^blocks\.\d+\.(\d+\.)?ls1\.gamma$"):
        return "dinov2"
    return "dino"


def _pos_has_cls(state: Mapping[str, Any]) -> bool:
    """True when ``pos_embed`` has exactly ``1 + G * G`` positions (native / DINO layout)."""
    pos = state.get("pos_embed")
    if not isinstance(pos, Tensor) or pos.dim() != 3:
        return True  # reported as missing / mismatched later, with the key named
    return _is_square(pos.shape[1] - 1)


def _is_square(n: int) -> bool:
    return n >= 1 and math.isqrt(n) ** 2 == n


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop leading ``module.`` / ``backbone.`` (DDP and DINO wrappers) from every key."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The weights inside generic wrappers ``{"model": {...}}`` / ``{"state_dict": {...}}``
    (a dict without tensors at its top level)."""
    while not any(isinstance(v, Tensor) for v in checkpoint.values()):
        inner = [checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), Mapping)]
        if not inner or "teacher" in checkpoint:
            break
        checkpoint = inner[0]
    return checkpoint


def _select_training_weights(checkpoint: Mapping[str, Any], checkpoint_key: str) -> dict[str, Any]:
    """``checkpoint[checkpoint_key]`` (DINO) or the keys under ``f"{checkpoint_key}."`` (DINOv2)."""
    if isinstance(checkpoint.get(checkpoint_key), Mapping):
        return dict(checkpoint[checkpoint_key])
    prefix = f"{checkpoint_key}."
    selected = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    if not selected:
        available = sorted({k.split(".")[0] for k, v in checkpoint.items() if isinstance(v, Mapping) or "." in k})
        raise CheckpointError(
            f"training checkpoint has no {checkpoint_key!r} weights; it has: {', '.join(available)}"
        )
    return selected


def convert_state_dict(
    state_dict: Mapping[str, Any], layout: str, checkpoint_key: str = "teacher"
) -> dict[str, Tensor]:
    """``state_dict`` in ``layout`` -> native ``VisionTransformer`` keys.

    Keys that a layout does not know pass through unchanged, so that loading reports them as
    unexpected under their original name. ``checkpoint_key`` picks ``teacher`` or ``student``
    of a ``"dino_training"`` checkpoint.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown checkpoint layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "dino_training":
        state = _strip_prefixes(_select_training_weights(state_dict, checkpoint_key))
        state = {k: v for k, v in state.items() if not k.startswith(_TRAINING_HEADS)}
        return _check_tensors(_flatten_chunks(state))
    if layout == "labelwise":
        return _check_tensors(dict(state_dict))
    if layout in ("dino", "dinov2"):
        return _check_tensors(_flatten_chunks(_strip_prefixes(state_dict)))
    if layout == "timm":
        return _check_tensors(_convert_timm(_strip_prefixes(state_dict)))
    return _check_tensors(_convert_hf(dict(state_dict), dinov2=layout == "hf_dinov2"))


def _check_tensors(state: dict[str, Any]) -> dict[str, Tensor]:
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"key {key!r} holds a {type(value).__name__}, not a tensor")
    return state


def _flatten_chunks(state: dict[str, Any]) -> dict[str, Any]:
    """DINOv2 ``block_chunks``: ``blocks.{chunk}.{i}.*`` -> ``blocks.{i}.*`` (``i`` is global)."""
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.")
    return {chunked.sub(r"blocks.\1.", key): value for key, value in state.items()}


def _convert_timm(state: dict[str, Any]) -> dict[str, Any]:
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "attn_pool."))}
    if "fc_norm.weight" in state and "norm.weight" not in state:
        state["norm.weight"] = state.pop("fc_norm.weight")
        state["norm.bias"] = state.pop("fc_norm.bias")
    else:
        state.pop("fc_norm.weight", None)
        state.pop("fc_norm.bias", None)
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
    pos, cls = state.get("pos_embed"), state.get("cls_token")
    if not isinstance(pos, Tensor) or not isinstance(cls, Tensor) or pos.dim() != 3:
        return state  # missing keys are reported by the loader
    registers = state.get("register_tokens")
    num_registers = registers.shape[1] if isinstance(registers, Tensor) and registers.dim() == 3 else 0
    length = pos.shape[1]
    # Grid sizes are ambiguous for tiny grids (1 + 4 registers + 2*2 = 3*3); timm's register
    # models use no_embed_class=True, so that reading is tried first when registers exist.
    if _is_square(length - 1) and not num_registers:  # [cls, patches]: already native
        pass
    elif _is_square(length):  # no_embed_class: patches only, prefix tokens carry no position
        state["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    elif num_registers and _is_square(length - 1 - num_registers):  # [cls, registers, patches]
        state["register_tokens"] = registers + pos[:, 1:1 + num_registers]
        state["pos_embed"] = torch.cat([pos[:, :1], pos[:, 1 + num_registers:]], dim=1)
    elif _is_square(length - 1):  # [cls, patches] with registers without positions
        pass
    else:
        raise CheckpointError(
            f"key 'pos_embed' has {length} positions, which is neither a square grid nor a grid "
            f"plus the class token ({num_registers} register tokens)"
        )
    return state


_HF_BLOCK_RULES = [  # (HF key inside encoder.layer.{i}., native key inside blocks.{i}.)
    ("layernorm_before.", "norm1."),       # HF ViT
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("attention.output.dense.", "attn.proj."),
    ("norm1.", "norm1."),                  # HF Dinov2
    ("norm2.", "norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
]
_HF_TOP_RULES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _convert_hf(state: dict[str, Any], dinov2: bool) -> dict[str, Any]:
    prefix = "dinov2." if dinov2 else "vit."
    if any(key.startswith(prefix) for key in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # drop the classifier
    state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "classifier."))}
    out: dict[str, Any] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    layer = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
    for key, value in state.items():
        if key == "embeddings.mask_token" and isinstance(value, Tensor):
            out["mask_token"] = value.reshape(1, -1)  # ViTModel: [1, 1, D]; Dinov2: [1, D]
            continue
        if key in _HF_TOP_RULES:
            out[_HF_TOP_RULES[key]] = value
            continue
        match = layer.match(key)
        if match is None:
            out[key] = value
            continue
        index, rest = match.group(1), match.group(2)
        qkv_match = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if qkv_match:
            qkv.setdefault((int(index), qkv_match.group(2)), {})[qkv_match.group(1)] = value
            continue
        for hf_part, native_part in _HF_BLOCK_RULES:
            if rest.startswith(hf_part):
                out[f"blocks.{index}.{native_part}{rest[len(hf_part):]}"] = value
                break
        else:
            out[key] = value  # unknown: reported as unexpected under its own name
    for (index, kind), parts in sorted(qkv.items()):
        for name in ("query", "key", "value"):
            if name not in parts:
                raise CheckpointError(
                    f"missing key 'encoder.layer.{index}.attention.attention.{name}.{kind}' "
                    "(query, key and value are needed to build qkv)"
                )
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


# ---------------------------------------------------------------------------------------------
# Architecture inference


def _tensor(state: Mapping[str, Tensor], key: str, source: str, dims: int) -> Tensor:
    value = state.get(key)
    if value is None:
        raise CheckpointError(f"{source}: missing key {key!r} (needed to infer the architecture)")
    if value.dim() != dims:
        raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)}, expected {dims} dimensions")
    return value


def infer_config(
    state: Mapping[str, Tensor], source: str = "checkpoint", num_heads: int | None = None
) -> dict[str, Any]:
    """``ViTConfig`` keywords read off a native-layout ``state`` (see the module docstring).

    ``num_heads`` fills in the head count when the width is not a standard one.
    """
    dim = _tensor(state, "cls_token", source, 3).shape[-1]
    kernel = _tensor(state, "patch_embed.proj.weight", source, 4)
    if kernel.shape[-1] != kernel.shape[-2]:
        raise CheckpointError(f"{source}: key 'patch_embed.proj.weight' has a non-square kernel {tuple(kernel.shape)}")
    positions = _tensor(state, "pos_embed", source, 3).shape[1] - 1
    if not _is_square(positions):
        raise CheckpointError(
            f"{source}: key 'pos_embed' has {positions + 1} positions, not 1 + a square grid"
        )
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})
    if depth == 0:
        raise CheckpointError(f"{source}: no transformer blocks (keys 'blocks.N.*')")
    heads = num_heads if num_heads is not None else _HEADS_BY_DIM.get(dim)
    if heads is None:
        raise CheckpointError(
            f"{source}: cannot infer num_heads for embed_dim {dim} (not a standard width); "
            "pass num_heads=... to load_vit"
        )
    registers = state.get("register_tokens")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    arch = next((name for name, dims in VIT_ARCHS.items() if dims == (dim, depth, heads)), CUSTOM_ARCH)
    return {
        "arch": arch,
        "patch_size": int(kernel.shape[-1]),
        "embed_dim": int(dim),
        "depth": depth,
        "num_heads": int(heads),
        "mlp_ratio": fc1.shape[0] / dim if isinstance(fc1, Tensor) and fc1.dim() == 2 else 4.0,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "num_registers": int(registers.shape[1]) if isinstance(registers, Tensor) and registers.dim() == 3 else 0,
        "layer_scale": 1e-5 if "blocks.0.ls1.gamma" in state else None,  # init value: irrelevant once loaded
        "pos_grid": math.isqrt(positions),
        "mask_token": "mask_token" in state,
        "in_channels": int(kernel.shape[1]),
    }


def _heads_from_files(path: Path, metadata: Mapping[str, str]) -> int | None:
    """Head count from safetensors metadata or a Hugging Face ``config.json`` beside ``path``."""
    for key in ("num_heads", "num_attention_heads"):
        if str(metadata.get(key, "")).isdigit():
            return int(metadata[key])
    config_json = path.with_name("config.json")
    if config_json.is_file():
        try:
            heads = json.loads(config_json.read_text()).get("num_attention_heads")
        except (json.JSONDecodeError, OSError, AttributeError):
            return None
        if isinstance(heads, int) and heads > 0:
            return heads
    return None


# ---------------------------------------------------------------------------------------------
# Loading and saving


def _load_strict(model: VisionTransformer, state: dict[str, Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {', '.join(map(repr, missing[:8]))}"
                              f"{' ...' if len(missing) > 8 else ''} for this architecture")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key(s) {', '.join(map(repr, unexpected[:8]))}"
                              f"{' ...' if len(unexpected) > 8 else ''} (unsupported variant or architecture)")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(value.shape)} in the checkpoint, "
                f"the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)


def load_vit(
    path: str | Path,
    *,
    layout: str | None = None,
    checkpoint_key: str = "teacher",
    **config_overrides: Any,
) -> VisionTransformer:
    """A ``VisionTransformer`` with the weights of ``path``: a file, a Hugging Face model folder
    (``FOLDER_FILES`` + ``config.json``) or a backbone name that ``resolve_backbone`` knows.

    ``layout`` forces a layout instead of ``detect_layout``; ``checkpoint_key`` selects the
    ``teacher`` / ``student`` of a DINO training checkpoint; ``config_overrides`` are
    ``ViTConfig`` fields that replace the inferred ones (``num_heads``, ``drop_path``,
    ``attention_kernel`` ...). Raises ``CheckpointError`` naming the file and the key at fault.
    """
    path = resolve_backbone(path)
    if path.is_dir():
        found = [path / name for name in FOLDER_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path}: folder has none of {', '.join(FOLDER_FILES)}")
        path = found[0]
    raw, metadata = read_checkpoint(path)
    raw = unwrap_checkpoint(raw)
    source = str(path)
    try:
        layout = layout or detect_layout(raw, metadata)
        state = convert_state_dict(raw, layout, checkpoint_key=checkpoint_key)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    unknown = sorted(set(config_overrides) - set(ViTConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"load_vit: unknown ViTConfig option(s) {', '.join(map(repr, unknown))}")
    if layout == "labelwise":
        try:
            values = json.loads(metadata["vit_config"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{source}: metadata 'vit_config' is missing or corrupt: {exc}") from exc
    else:
        heads = config_overrides.get("num_heads") or _heads_from_files(path, metadata)
        values = infer_config(state, source, num_heads=heads)
    values.update(config_overrides)
    model = VisionTransformer(ViTConfig.from_dict(values))
    _load_strict(model, state, source)
    return model


def save_vit(model: VisionTransformer, path: str | Path) -> Path:
    """Write ``model``'s weights to a ``.safetensors`` file with its ``ViTConfig`` as JSON in the
    metadata (atomically: a crash leaves any previous file intact). Returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: save_vit writes safetensors files; use a .safetensors name")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": METADATA_FORMAT,
        "vit_config": json.dumps(model.config.to_dict()),
        "num_heads": str(model.num_heads),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------
# Named backbones


def cache_dir() -> Path:
    """Where named backbones are stored: ``$LABELWISE_CACHE`` or ``~/.cache/labelwise``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "labelwise")


def download(url: str, target: Path, timeout: float = 60.0) -> None:
    """Download ``url`` to ``target`` atomically (a partial download never appears there)."""
    with atomic_path(target) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)


def resolve_backbone(name_or_path: str | Path) -> Path:
    """Path of a backbone file: a pretraining run folder -> its weights, another existing path as
    is; ``labelwise_default`` -> ``DEFAULT_BACKBONE_PATH``; a name of ``NAMED_BACKBONES`` -> the
    cached file, downloaded into ``cache_dir()`` first when absent. Offline, the error says which
    file to put where."""
    text = str(name_or_path)
    if text == DEFAULT_NAME:
        if not DEFAULT_BACKBONE_PATH.is_file():
            raise CheckpointError(
                f"backbone {DEFAULT_NAME!r}: {DEFAULT_BACKBONE_PATH} is missing; pretrain the "
                "project's backbone (or copy it there) first"
            )
        return DEFAULT_BACKBONE_PATH
    if text not in NAMED_BACKBONES:
        path = Path(name_or_path).expanduser()
        if path.is_dir():  # a `labelwise pretrain` run folder gives its weights; other folders (Hugging Face) stay
            from labelwise.models.artifact import backbone_weights_file

            found = backbone_weights_file(path)
            if found is not None:
                return found
        if path.exists() or any(sep in text for sep in ("/", os.sep)) or path.suffix:
            return path  # read_checkpoint reports a missing file with its path
        raise CheckpointError(
            f"unknown backbone {text!r}: not a file, and not one of "
            f"{', '.join([*NAMED_BACKBONES, DEFAULT_NAME])}"
        )
    file_name, url = NAMED_BACKBONES[text]
    target = cache_dir() / file_name
    if target.is_file():
        return target
    try:
        download(url, target)
    except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
        raise CheckpointError(
            f"backbone {text!r} is not in the cache and could not be downloaded ({_first_line(exc)}); "
            f"download {url} and place it at {target}"
        ) from exc
    return target
