"""Transfer learning: initialise a model's encoder from pretrained weights before training.

``initialise_from(model, path)`` accepts

1. a labelwise exported model (a run folder or a folder with ``model.json`` +
   ``weights.safetensors``, or an older ``model.safetensors``; see ``models/artifact.py``): the
   tensors under ``encoder.`` are used;
2. a pretraining run folder (its ``weights.safetensors``; older runs: ``backbone.safetensors``),
   or any other weights file (``.safetensors``; ``.pth`` / ``.pt`` / ``.bin`` read with
   ``torch.load(weights_only=True)``);
3. a named CNN weights file (``mobilenet_v2_imagenet``, ``mobilenet_v2_torchvision``; see
   ``labelwise.models.pretrained``) for a model built on that encoder with the same input
   convention;
4. for models whose encoder is a ``VisionTransformer`` (``vit_*``): any checkpoint
   ``labelwise.models.vit_loading`` understands (DINO, DINOv2, timm, Hugging Face, ``save_vit``
   files), converted to the native key names first, or a backbone name ``resolve_backbone``
   knows.

Matching is by name and shape inside the encoder. For plain weights files the key prefix
in front of the encoder's own names (``""``, ``"encoder."``, ``"backbone."``, ``"module."`` ...)
is found automatically: the prefix under which the most names match wins. A ViT position
embedding for another grid size is resized bicubically (noted in the report). Nothing outside
the encoder is loaded: the decoder and the classifier start from their own initialisation.

The :class:`InitReport` partitions names exactly: ``loaded`` + ``new`` = every tensor of the
model's state dict (``new``: not initialised from the checkpoint); ``loaded`` + ``ignored`` =
every tensor of the checkpoint (``ignored``: outside the encoder, unknown to the model, or of
another shape, with both shapes), names as the checkpoint spells them after format conversion.
A checkpoint of which nothing matches (scalars such as BatchNorm step counters aside) is an error,
since it is almost always the wrong file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.config import ModelConfig
from labelwise.errors import CheckpointError
from labelwise.io.atomic import atomic_write_json
from labelwise.models.artifact import backbone_weights_file, read_artifact_files

__all__ = ["InitReport", "configure_encoder", "encoder_lr_scale", "initialise_from", "read_pretrained"]

REPORT_NAME = "init_report.json"
_PREFIX_HINTS = ("", "encoder.", "backbone.", "module.", "model.", "module.encoder.", "model.encoder.",
                 "module.backbone.", "teacher.", "student.", "teacher.backbone.", "student.backbone.")


@dataclass
class InitReport:
    """What :func:`initialise_from` did (see the module docstring for the partition).

    ``ignored`` items: ``{"name", "reason", "checkpoint_shape", "model_shape"}`` (the model shape
    is None when the model has no such tensor).
    """

    source: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the console."""
        reasons: dict[str, int] = {}
        for item in self.ignored:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        lines = [f"init from {self.source} ({self.kind}): loaded {len(self.loaded)} tensors, "
                 f"{len(self.new)} new (not in the checkpoint), {len(self.ignored)} ignored"
                 + (f" ({', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))})" if reasons else "")]
        mismatched = [i for i in self.ignored if i["reason"] == "shape mismatch"]
        for item in mismatched[:5]:
            lines.append(f"  shape mismatch: {item['name']} checkpoint {item['checkpoint_shape']} vs model "
                         f"{item['model_shape']}")
        if len(mismatched) > 5:
            lines.append(f"  ... and {len(mismatched) - 5} more shape mismatches")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "loaded": self.loaded, "new": self.new,
                "ignored": self.ignored, "notes": self.notes,
                "counts": {"loaded": len(self.loaded), "new": len(self.new), "ignored": len(self.ignored)}}

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically); returns the path."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path


# ---------------------------------------------------------------------------------------------
# Reading the source


def _encoder_prefix(model: nn.Module) -> str:
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return ""
    for name, module in model.named_modules():
        if module is encoder and name:
            return name + "."
    return ""


def _is_vit(module: nn.Module) -> bool:
    from labelwise.models.vit import VisionTransformer

    return isinstance(module, VisionTransformer)


def _raw_weights(path: Path) -> dict[str, Tensor]:
    from labelwise.models.vit_loading import read_checkpoint, unwrap_checkpoint

    raw, _ = read_checkpoint(path)
    state = unwrap_checkpoint(raw)
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _vit_weights(path: Path) -> dict[str, Tensor] | None:
    """Native-key ViT weights of ``path``, or None when it is no ViT layout vit_loading knows."""
    from labelwise.models.vit_loading import convert_state_dict, detect_layout, read_checkpoint, unwrap_checkpoint

    raw, metadata = read_checkpoint(path)
    raw = unwrap_checkpoint(raw)
    try:
        layout = detect_layout(raw, metadata)
        return convert_state_dict(raw, layout)
    except CheckpointError:
        return None


def read_pretrained(path: str | Path, model: nn.Module) -> tuple[str, str, dict[str, Tensor], str]:
    """``(kind, source, weights, prefix)``: the checkpoint's tensors and the prefix in front of
    the encoder's names in them (for labelwise exports the full model names, prefix ``encoder.``).
    """
    path = Path(path)
    encoder = getattr(model, "encoder", model)
    vit = _is_vit(encoder)
    pretrained_backbone = backbone_weights_file(path if path.is_dir() else path.parent) if path.exists() else None
    if path.is_dir():
        if pretrained_backbone is not None:
            path = pretrained_backbone
        elif (path / "model.json").exists():
            _, weights = read_artifact_files(path)
            return "labelwise-model", str(path), weights, _encoder_prefix(model)
        else:
            raise CheckpointError(f"{path}: holds neither a labelwise model (model.json + weights.safetensors) nor "
                                  "a pretrained backbone (a `labelwise pretrain` run folder)")
    elif (path.name in ("weights.safetensors", "model.safetensors") and (path.parent / "model.json").exists()
          and pretrained_backbone != path):
        _, weights = read_artifact_files(path)
        return "labelwise-model", str(path), weights, _encoder_prefix(model)
    elif not path.exists():
        from labelwise.models.pretrained import is_weights_name

        if vit:
            from labelwise.models.vit_loading import resolve_backbone

            path = resolve_backbone(str(path))
        elif is_weights_name(str(path)):
            path = _named_cnn_weights(str(path), encoder)
        if not path.exists():
            raise CheckpointError(f"{path}: no such model folder or weights file")
    kind = "backbone" if path == backbone_weights_file(path.parent) else "weights"
    if vit:
        converted = _vit_weights(path)
        if converted is not None:
            return f"{kind} (ViT)", str(path), converted, ""
    weights = _raw_weights(path)
    return kind, str(path), weights, _best_prefix(weights, encoder.state_dict())


def _named_cnn_weights(name: str, encoder: nn.Module) -> Path:
    """The file of a named CNN weights file (``mobilenet_v2_imagenet`` ...), after checking that
    ``encoder`` was built for its input convention (padding rule; the model normalises)."""
    from labelwise.errors import ConfigError
    from labelwise.models.pretrained import CONVENTIONS, NAMED_WEIGHTS, resolve_weights

    named = NAMED_WEIGHTS[name]
    rule = getattr(encoder, "padding_rule", None)
    if rule is not None and rule != CONVENTIONS[named.convention].padding_rule:
        raise ConfigError(f"init {name!r}: these weights expect input convention {named.convention!r}, the model was "
                          f"built for another; set the model option encoder_weights: {name} instead of init, or "
                          f"encoder_convention: {named.convention}")
    return resolve_weights(name)


def _best_prefix(weights: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> str:
    """The key prefix under which most checkpoint names are encoder names (ties: the shortest)."""
    candidates = set(_PREFIX_HINTS)
    for key in weights:
        parts = key.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))

    def score(prefix: str) -> tuple[int, int]:
        hits = sum(1 for key in weights if key.startswith(prefix) and key[len(prefix):] in own)
        return hits, -len(prefix)

    return max(sorted(candidates), key=score)


# ---------------------------------------------------------------------------------------------
# Loading


def _resize_pos_embed(value: Tensor, shape: torch.Size) -> Tensor | None:
    """A ``[1, 1 + g*g, D]`` position embedding resized bicubically to ``shape`` (same layout), or
    None when either is not of that form."""
    if value.dim() != 3 or len(shape) != 3 or value.shape[0] != 1 or shape[0] != 1 or value.shape[2] != shape[2]:
        return None
    src, dst = value.shape[1] - 1, shape[1] - 1
    g_src, g_dst = math.isqrt(src), math.isqrt(dst)
    if g_src * g_src != src or g_dst * g_dst != dst:
        return None
    grid = value[:, 1:].reshape(1, g_src, g_src, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_dst, g_dst), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, dst, -1).to(value.dtype)
    return torch.cat([value[:, :1], grid], dim=1)


def initialise_from(model: nn.Module, path: str | Path, *, run_dir: str | Path | None = None,
                    verbose: bool = True) -> InitReport:
    """Load the pretrained encoder at ``path`` into ``model`` (in place) by name and shape.

    Args:
        model: a labelwise model (its ``encoder`` is what gets loaded), or a bare encoder.
        path: see the module docstring.
        run_dir: when given, the report is written to ``run_dir/init_report.json``.
        verbose: print the report's summary.

    Returns:
        The :class:`InitReport`.

    Raises:
        CheckpointError: unreadable source, or no tensor of it matches the encoder.
    """
    kind, source, weights, prefix = read_pretrained(path, model)
    model_prefix = _encoder_prefix(model)
    own = model.state_dict()
    encoder_names = {name for name in own if name.startswith(model_prefix)}
    report = InitReport(source=source, kind=kind)
    loaded: dict[str, Tensor] = {}
    for key in sorted(weights):
        value = weights[key]
        if not key.startswith(prefix):
            report.ignored.append({"name": key, "reason": "outside the encoder",
                                   "checkpoint_shape": list(value.shape), "model_shape": None})
            continue
        target = model_prefix + key[len(prefix):]
        if target not in encoder_names:
            report.ignored.append({"name": key, "reason": "not in the model",
                                   "checkpoint_shape": list(value.shape), "model_shape": None})
            continue
        if tuple(value.shape) != tuple(own[target].shape):
            resized = _resize_pos_embed(value, own[target].shape) if target.endswith("pos_embed") else None
            if resized is None:
                report.ignored.append({"name": key, "reason": "shape mismatch", "checkpoint_shape": list(value.shape),
                                       "model_shape": list(own[target].shape)})
                continue
            report.notes.append(f"{key}: position embedding resized from {list(value.shape)} to "
                                f"{list(own[target].shape)} (bicubic)")
            value = resized
        loaded[target] = value
    if not any(value.dim() > 0 for value in loaded.values()):  # BatchNorm step counters alone do not count
        sample_ckpt = ", ".join(sorted(weights)[:4]) or "(none)"
        sample_model = ", ".join(sorted(encoder_names)[:4]) or "(none)"
        raise CheckpointError(f"{source}: no tensor matches the model's encoder by name and shape "
                              f"(checkpoint keys: {sample_ckpt} ...; encoder keys: {sample_model} ...)")
    with torch.no_grad():
        for name, value in loaded.items():
            own[name].copy_(value.to(dtype=own[name].dtype, device=own[name].device))
    report.loaded = sorted(loaded)
    report.new = sorted(set(own) - set(loaded))
    if run_dir is not None:
        report.write(Path(run_dir) / REPORT_NAME)
    if verbose:
        print(report.summary())
    return report


# ---------------------------------------------------------------------------------------------
# Fine-tuning settings


def configure_encoder(model: nn.Module, config: ModelConfig) -> dict[str, bool]:
    """Apply ``config.freeze_encoder`` / ``freeze_encoder_bn`` (``ModelConfig``) to ``model``;
    returns what was applied, ``{"freeze_encoder", "freeze_encoder_bn"}``."""
    from labelwise.models import SegmentationModel

    if not isinstance(model, SegmentationModel):
        raise TypeError(f"configure_encoder expects a SegmentationModel, got {type(model).__name__}")
    freeze_bn = config.freeze_encoder_bn
    if freeze_bn is None:
        freeze_bn = bool(getattr(model, "folded_batchnorm", False))
    if config.freeze_encoder:
        model.freeze_encoder()
    elif freeze_bn:
        model.freeze_encoder_bn()
    return {"freeze_encoder": config.freeze_encoder, "freeze_encoder_bn": config.freeze_encoder or freeze_bn}


def encoder_lr_scale(model: nn.Module, scale: float):
    """``name -> multiplier`` for ``TrainerOptions.lr_scale``: ``scale`` for the parameters of the
    encoder of every segmentation model inside ``model`` (e.g. a semi-supervised student), 1
    elsewhere; None when ``scale`` is 1."""
    from labelwise.models import SegmentationModel

    if scale == 1.0:
        return None
    encoder_ids = {id(p) for m in model.modules() if isinstance(m, SegmentationModel) for p in m.encoder.parameters()}
    names = {name for name, p in model.named_parameters() if id(p) in encoder_ids}
    return lambda name: scale if name in names else 1.0
