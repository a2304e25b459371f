"""Export and reload supervised segmentation models (``kind: segmenter`` artifacts, see
:mod:`labelwise.models.artifact`): what ``train``, ``semi train`` and the weak pipeline's
segmenter write into their run folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from labelwise.config import EvalConfig, from_dict, to_dict
from labelwise.data.classmap import ClassMap
from labelwise.errors import CheckpointError
from labelwise.models import SegmentationModel
from labelwise.models.artifact import load_artifact, provenance, save_artifact

__all__ = ["LoadedModel", "export_model", "load_model", "preprocessing_of"]


def preprocessing_of(model: SegmentationModel) -> dict[str, Any]:
    """What a segmentation model expects and does to its input, for ``model.json``."""
    convention = getattr(model, "convention", None)
    return {"input": "RGB float [B, 3, H, W] in [0, 1]; the model normalises and pads itself",
            "mean": [round(float(v), 6) for v in model.pixel_mean.flatten()],
            "std": [round(float(v), 6) for v in model.pixel_std.flatten()],
            "padding": getattr(convention, "padding_rule", "symmetric"),
            "pad_to_multiple_of": int(model.output_stride)}


def export_model(folder: str | Path, model: SegmentationModel, class_map: ClassMap, eval_config: EvalConfig,
                 extra: dict[str, Any] | None = None, *, data: Mapping[str, Any] | None = None,
                 init: str | None = None) -> Path:
    """Write ``folder/weights.safetensors`` + ``model.json`` so that ``load_model(folder)`` (or
    ``labelwise.load``) rebuilds ``model`` for inference. ``data`` (the training data config) and
    ``init`` (the checkpoint the encoder started from) are recorded in ``training`` / ``source``."""
    architecture = model.config()
    source = {key: architecture[key] for key in ("encoder", "encoder_weights", "backbone") if key in architecture}
    if init:
        source["init"] = str(init)
    return save_artifact(folder, "segmenter", model, architecture, class_map, preprocessing=preprocessing_of(model),
                         source=source, eval_config=to_dict(eval_config), training=provenance(data), extra=extra)


@dataclass
class LoadedModel:
    """A model rebuilt from an export, with what is needed to use it."""

    model: SegmentationModel
    class_map: ClassMap
    eval_config: EvalConfig
    info: dict[str, Any]


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild an exported segmentation model (a run folder, or a folder holding ``model.json``
    + ``weights.safetensors``; older ``model.safetensors`` folders too) in eval mode."""
    artifact = load_artifact(path, map_location)
    if artifact.kind != "segmenter":
        raise CheckpointError(f"{artifact.folder}: a {artifact.kind!r} model, not a supervised segmenter; "
                              f"load it with labelwise.load()")
    eval_config = from_dict(EvalConfig, artifact.info.get("eval", {}), prefix="model.json eval.")
    return LoadedModel(artifact.module, artifact.class_map, eval_config, artifact.info)  # type: ignore[arg-type]
