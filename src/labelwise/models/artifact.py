"""The one model artifact every regime exports: a folder with ``model.json`` + ``weights.safetensors``.

``model.json`` (format ``labelwise-artifact/1``)::

    kind            "segmenter" (class logits), "clusters" (scores to unsupervised cluster
                    centroids), "classifier" (the image-tag classifier of weak supervision) or
                    "backbone" (a pretrained encoder, ``labelwise pretrain``)
    architecture    what rebuilds the network without its weights (``models.create`` options, or
                    the ViT config + head + cluster count of a ``ClusterSegmenter``, or for a
                    refined cluster model ``{"segmenter": <models.create options>}``)
    class_map       names, display colors and ignore index of the output channels
    preprocessing   what the network expects and does itself: RGB in [0, 1], its mean/std, padding
    source          the encoder / backbone and the pretrained weights it started from
    eval            the evaluation settings it was exported with (window, overlap, flip, input_scale)
    training        command, commit, labelwise version, date and data config of the run
    labelwise_version, format

``weights.safetensors`` holds the network's ``state_dict`` (for ``clusters`` the backbone, the
code head and the centroids, or the segmenter of a refined cluster model), so a folder is
self-contained: copy it anywhere and :func:`load_artifact` (or ``labelwise.load``) rebuilds the
network in eval mode.

Writes are crash-safe: the weights are written first and ``model.json`` last, each through a
temporary file and one rename, so a folder whose ``model.json`` exists holds complete weights.

Only ``segmenter`` and ``clusters`` folders map images to per-pixel scores (:data:`KINDS`);
:func:`load_artifact` of a ``classifier`` folder (a weak run) loads the segmenter the run delivers
when there is one (``segmenter/``, or the last self-training round's that ``weak_run.json``
names), and a ``backbone`` folder fails with a message
saying what it is for. Older folders (labelwise 0.1: ``model.json`` of format ``labelwise-model/1``
+ ``model.safetensors``; unsupervised ``unsupervised.json`` + ``head.safetensors``; weak
``mct.json`` + ``mct.safetensors``; pretraining ``pretrain.json`` + ``backbone.safetensors``) still
load where they did.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from labelwise import __version__
from labelwise.data.classmap import ClassMap, default_palette
from labelwise.errors import CheckpointError, ConfigError, DataError
from labelwise.io.atomic import atomic_path, atomic_write_json
from labelwise.io.jsonfile import read_json
from labelwise.io.tensors import file_sha256, read_safetensors

__all__ = ["DESCRIPTIVE_KINDS", "FORMAT", "INFO_FILE", "KINDS", "WEIGHTS_FILE", "Artifact", "artifact_kind",
           "backbone_weights_file", "cluster_class_map", "is_artifact", "load_artifact", "provenance",
           "read_artifact_files", "save_artifact", "write_artifact_info"]

FORMAT = "labelwise-artifact/1"
INFO_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
LEGACY_FORMAT = "labelwise-model/1"
LEGACY_WEIGHTS = "model.safetensors"


def _build_segmenter(architecture: Mapping[str, Any]) -> nn.Module:
    from labelwise.models import create, skip_pretrained_weights

    options = dict(architecture)
    name, num_classes = options.pop("name"), options.pop("num_classes")
    with skip_pretrained_weights():  # the artifact's own weights replace them at once
        return create(name, num_classes=num_classes, **options)


def _build_clusters(architecture: Mapping[str, Any]) -> nn.Module:
    """A cluster model: the ``ClusterSegmenter`` (ViT + code head + centroids) of an unsupervised
    run, or, when ``architecture`` has a ``segmenter`` entry, the segmenter that self-training
    refinement trained on the run's cluster pseudo-labels (its ``K`` output logits are clusters,
    still unmatched to classes; :mod:`labelwise.methods.unsupervised.refine`)."""
    from labelwise.models.clusters import ClusterSegmenter

    if "segmenter" in architecture:
        return _build_segmenter(architecture["segmenter"])
    return ClusterSegmenter.from_config(dict(architecture))


#: ``kind -> builder(architecture) -> module``; each module maps images ``[B, 3, H, W]`` in [0, 1]
#: to scores ``[B, K, H, W]`` over the ``K`` entries of the artifact's class map.
KINDS: dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    "segmenter": _build_segmenter,
    "clusters": _build_clusters,
}


#: Kinds of folders that hold no segmenter: what each is for (the error of :func:`load_artifact`).
DESCRIPTIVE_KINDS: dict[str, str] = {
    "classifier": "a weak-supervision classifier (stage 1 of `labelwise weak`), not a segmenter: use it with "
                  "`labelwise weak cams` / `weak pseudo-masks`, or run `labelwise weak run` to train the segmenter "
                  "it leads to (written to {folder}/segmenter, which this folder then loads as)",
    "backbone": "a pretrained backbone, which predicts no classes: start a segmenter from it with `labelwise "
                "train --init {folder}` or use it as the `features.backbone` of `labelwise unsupervised train`",
}
#: Where a weak run keeps the segmenter that loading the run folder gives (without self-training).
SEGMENTER_SUBFOLDER = "segmenter"
#: A weak run's report; its ``model_subfolder`` names the segmenter the run delivers (the last
#: self-training round's), written when every stage has finished.
WEAK_RUN_FILE = "weak_run.json"


def weak_run_segmenter(folder: Path) -> Path:
    """The segmenter folder a weak run folder loads as: the ``model_subfolder`` its finished
    ``weak_run.json`` names (inside the run folder), else ``folder/segmenter``."""
    report = folder / WEAK_RUN_FILE
    if report.is_file():
        subfolder = read_json(report, "weak run report").get("model_subfolder")
        if isinstance(subfolder, str) and subfolder and not Path(subfolder).is_absolute() \
                and ".." not in Path(subfolder).parts and artifact_kind(folder / subfolder) in KINDS:
            return folder / subfolder
    return folder / SEGMENTER_SUBFOLDER


def cluster_class_map(clusters: int) -> ClassMap:
    """Display names ``cluster_0 ...`` and palette colors for ``clusters`` unmatched cluster ids."""
    return ClassMap(names=tuple(f"cluster_{i}" for i in range(clusters)), colors=tuple(default_palette(clusters)))


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def provenance(data: Mapping[str, Any] | None = None, command: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``training`` record of an artifact: command line, git commit of the labelwise source
    (None outside a checkout), labelwise version, UTC date and the data configuration."""
    argv = list(command) if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]
    return {"command": " ".join(argv), "commit": _git_commit(), "labelwise_version": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data": dict(data) if data is not None else None}


def save_artifact(folder: str | Path, kind: str, module: nn.Module, architecture: Mapping[str, Any],
                  class_map: ClassMap | None, *, preprocessing: Mapping[str, Any] | None = None,
                  source: Mapping[str, Any] | None = None, eval_config: Mapping[str, Any] | None = None,
                  training: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/weights.safetensors`` (``module.state_dict()``) and then ``folder/model.json``.

    Returns the folder. For the kinds of :data:`KINDS`, ``architecture`` must rebuild ``module``
    through ``KINDS[kind]``.
    """
    folder = Path(folder)
    _check_kind(kind)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    return write_artifact_info(folder, kind, architecture, class_map, preprocessing=preprocessing, source=source,
                               eval_config=eval_config, training=training, extra=extra)


def _check_kind(kind: str) -> None:
    if kind not in KINDS and kind not in DESCRIPTIVE_KINDS:
        raise ValueError(f"artifact kind {kind!r}: expected one of {sorted([*KINDS, *DESCRIPTIVE_KINDS])}")


def write_artifact_info(folder: str | Path, kind: str, architecture: Mapping[str, Any], class_map: ClassMap | None,
                        *, preprocessing: Mapping[str, Any] | None = None, source: Mapping[str, Any] | None = None,
                        eval_config: Mapping[str, Any] | None = None, training: Mapping[str, Any] | None = None,
                        extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/model.json`` for the ``weights.safetensors`` already in ``folder`` (written
    by the caller when the weights file has its own header, as a pretrained ViT's has); the last
    write of an export. Returns the folder."""
    folder = Path(folder)
    _check_kind(kind)
    info = {"format": FORMAT, "kind": kind, "labelwise_version": __version__, "architecture": dict(architecture),
            "class_map": class_map.to_dict() if class_map is not None else None,
            "preprocessing": dict(preprocessing or {}), "source": dict(source or {}), "eval": dict(eval_config or {}),
            "training": dict(training or provenance()), **dict(extra or {})}
    if (folder / WEIGHTS_FILE).is_file():
        info["weights_sha256"] = file_sha256(folder / WEIGHTS_FILE)
    atomic_write_json(folder / INFO_FILE, info)
    return folder


def _load_weights(path: Path) -> dict[str, Tensor]:
    return read_safetensors(path, "weights file")


def is_artifact(folder: str | Path) -> bool:
    """Whether ``folder`` holds a model labelwise can load (any format, current or older)."""
    folder = Path(folder)
    return (folder / INFO_FILE).is_file() or (folder / "unsupervised.json").is_file()


def artifact_kind(folder: str | Path) -> str | None:
    """The ``kind`` of a model folder, older layouts included (``None``: not a model folder)."""
    folder = Path(folder)
    if (folder / INFO_FILE).is_file():
        info = read_json(folder / INFO_FILE, "model description")
        if isinstance(info, dict):
            return "segmenter" if info.get("format") == LEGACY_FORMAT else info.get("kind")
        return None
    if (folder / "unsupervised.json").is_file():
        return "clusters"
    if (folder / "mct.json").is_file():
        return "classifier"
    if (folder / "pretrain.json").is_file() or (folder / "backbone.safetensors").is_file():
        return "backbone"
    return None


def backbone_weights_file(folder: str | Path) -> Path | None:
    """The backbone weights of a pretraining run folder (``weights.safetensors`` of a ``backbone``
    artifact, or the older ``backbone.safetensors``); ``None`` when ``folder`` holds no backbone."""
    folder = Path(folder)
    if artifact_kind(folder) != "backbone":
        return None
    current = folder / WEIGHTS_FILE
    return current if (folder / INFO_FILE).is_file() else folder / "backbone.safetensors"


def _not_a_segmenter(folder: Path) -> CheckpointError | None:
    kind = artifact_kind(folder)
    if kind in DESCRIPTIVE_KINDS:
        return CheckpointError(f"{folder}: " + DESCRIPTIVE_KINDS[kind].format(folder=folder))
    return None


def read_artifact_files(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(model.json contents, weights)`` of a segmenter folder, current or older format; a
    ``.safetensors`` path is read with the ``model.json`` beside it."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise _not_a_segmenter(folder) or CheckpointError(
            f"{info_path}: model description is missing: {folder} is not a labelwise model folder (expected "
            f"{INFO_FILE} + {WEIGHTS_FILE}, as `labelwise train` and the other training commands write)")
    info = read_json(info_path, "model description")
    if not isinstance(info, dict):
        raise CheckpointError(f"{info_path}: model description must be a JSON object")
    if info.get("format") == LEGACY_FORMAT:  # labelwise 0.1 segmenters
        info = {**info, "kind": "segmenter", "architecture": info.get("model")}
        weights_path = path if path.is_file() else folder / LEGACY_WEIGHTS
    elif info.get("format") == FORMAT:
        weights_path = path if path.is_file() else folder / WEIGHTS_FILE
    else:
        raise CheckpointError(
            f"{info_path}: unknown model format {info.get('format')!r} (this labelwise {__version__} reads "
            f"{FORMAT} and {LEGACY_FORMAT}); export it again with the labelwise version that trained it, or retrain")
    digest = info.get("weights_sha256") if weights_path.parent == folder and weights_path.name == WEIGHTS_FILE else None
    return info, read_safetensors(weights_path, "weights file", digest if isinstance(digest, str) else None)


@dataclass
class Artifact:
    """A loaded model folder: the network (eval mode), its output classes and ``model.json``."""

    folder: Path
    kind: str
    module: nn.Module
    class_map: ClassMap
    info: dict[str, Any]


def _strict_load(module: nn.Module, weights: Mapping[str, Tensor], source: str) -> None:
    from labelwise.io.checkpoint import load_state_strict

    load_state_strict(module, dict(weights), source)


def _legacy_clusters(folder: Path, map_location: str | torch.device) -> Artifact:
    """An unsupervised export of labelwise 0.1 (``unsupervised.json`` + ``head.safetensors``, the
    backbone named by reference) as a ``clusters`` artifact."""
    from labelwise.models.clusters import ClusterSegmenter
    from labelwise.models.heads import ProjectionHead
    from labelwise.models.vit_loading import load_vit

    summary = read_json(folder / "unsupervised.json", "model summary")
    tensors = _load_weights(folder / "head.safetensors")
    try:
        method, in_dim, dim, backbone_name = summary["method"], int(summary["in_dim"]), int(summary["dim"]), \
            summary["backbone"]
        centroids = tensors["centroids"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder}: unsupervised export lacks {exc}") from exc
    head = None if method == "kmeans" else ProjectionHead(in_dim, dim)
    if head is not None:
        _strict_load(head, {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")},
                     str(folder / "head.safetensors"))
    try:
        backbone = load_vit(backbone_name)
    except Exception as exc:
        raise CheckpointError(f"{folder}: this older unsupervised export names its backbone {backbone_name!r}, "
                              f"which cannot be loaded here ({exc}); retrain it with `labelwise unsupervised train` "
                              f"to get a self-contained folder") from exc
    module = ClusterSegmenter(backbone, centroids, head).to(map_location).eval()
    info = {"format": "unsupervised.json", "kind": "clusters", "architecture": module.config(),
            "class_map": cluster_class_map(module.num_clusters).to_dict(), "unsupervised": summary, "eval": {}}
    return Artifact(folder, "clusters", module, cluster_class_map(module.num_clusters), info)


def load_artifact(path: str | Path, map_location: str | torch.device = "cpu") -> Artifact:
    """Rebuild the network of a model folder (any regime, current or older format) in eval mode.

    Raises:
        CheckpointError: naming the file at fault: missing or corrupt files, weights that do not
            match the architecture, an unknown format or kind, or a folder that holds no
            segmenter (with what to do instead).
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: no such model folder (expected a folder with {INFO_FILE} + {WEIGHTS_FILE})")
    if not (folder / INFO_FILE).is_file() and (folder / "unsupervised.json").is_file():
        return _legacy_clusters(folder, map_location)
    kind = artifact_kind(folder)
    if kind == "classifier" and path.is_dir() and artifact_kind(weak_run_segmenter(folder)) in KINDS:
        return load_artifact(weak_run_segmenter(folder), map_location)  # a weak run: its final segmenter
    not_a_segmenter = _not_a_segmenter(folder)
    if not_a_segmenter is not None:
        raise not_a_segmenter
    info, weights = read_artifact_files(path)
    kind = info.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"{folder / INFO_FILE}: unknown kind {kind!r} (expected one of {sorted(KINDS)})")
    where = str(folder / INFO_FILE)
    try:
        class_map = ClassMap.from_dict(info["class_map"], where=where)
        module = KINDS[kind](info["architecture"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: model description lacks {exc}") from exc
    except (ConfigError, DataError, ValueError) as exc:
        raise CheckpointError(f"{where}: the model it describes cannot be built ({exc})") from exc
    _strict_load(module, weights, str(folder))
    module.to(map_location).eval()
    return Artifact(folder, kind, module, class_map, info)
