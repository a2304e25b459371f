"""Pieces every regime shares: datasets from a DataConfig, seeding, model export and loading."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from labelwise import __version__
from labelwise.config import DataConfig, EvalConfig, to_dict
from labelwise.data import AerialTiles, CamVid, ClassMap, FolderDataset, RandomCropDataset, SyntheticShapes
from labelwise.data.splits import NamedSubset, dataset_names, read_name_list
from labelwise.engine.checkpoint import load_state_strict, read_model_files, save_model
from labelwise.errors import CheckpointError, ConfigError
from labelwise.models import SegmentationModel, create, skip_pretrained_weights


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DataSplits:
    """Training and evaluation datasets of one DataConfig, and their class map.

    ``train_source`` is the dataset the training samples are drawn from before random cropping
    (for class statistics): the whole tiles for aerial data, ``train`` itself otherwise.
    """

    train: Dataset
    val: Dataset
    class_map: ClassMap
    train_source: Dataset


def _class_map_for(config: DataConfig, root: Path) -> ClassMap:
    path = Path(config.class_map) if config.class_map else root / "classes.json"
    return ClassMap.from_json(path)


def build_eval_dataset(config: DataConfig, split: str | None = None) -> tuple[Dataset, ClassMap]:
    """The evaluation split of ``config`` (``split`` overrides ``val_split``; for aerial data a
    comma-separated list of tile numbers)."""
    split = split or config.val_split
    if config.dataset == "synthetic":
        dataset = SyntheticShapes(
            num_images=config.synthetic_val_images,
            size=config.synthetic_size,
            num_classes=config.synthetic_classes,
            seed=config.synthetic_seed + 1_000_003,
        )
        return dataset, dataset.class_map
    root = Path(config.root or "")
    if not root.exists():
        raise ConfigError(f"data.root: {root} does not exist")
    if config.dataset == "camvid":
        dataset = CamVid(root, split=split, resize=config.resize, on_error=config.on_error)
        return dataset, dataset.class_map
    if config.dataset == "folder":
        class_map = _class_map_for(config, root)
        dataset = FolderDataset(root / split, class_map, resize=config.resize, on_error=config.on_error)
        return dataset, class_map
    if config.dataset == "aerial":
        tiles: list[Any] = config.val_tiles if split == config.val_split else _parse_tiles(split)
        class_map = _class_map_for(config, root)
        dataset = AerialTiles(root, tiles=tiles, class_map=class_map)
        return dataset, class_map
    raise ConfigError(f"data.dataset: unknown dataset {config.dataset!r}")


def _parse_tiles(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(f"split {text!r}: for aerial data give tile numbers, e.g. 6,7") from exc


def build_datasets(config: DataConfig, seed: int = 0) -> DataSplits:
    """Training and validation datasets described by ``config`` (the training split restricted
    to ``config.train_list`` when it is set)."""
    if config.train_list and config.dataset == "aerial":
        raise ConfigError("data.train_list: aerial tiles are trained on random crops; choose the labelled tiles "
                          "with data.train_tiles")
    splits = _build_datasets(config, seed)
    if not config.train_list:
        return splits
    names = read_name_list(config.train_list, dataset_names(splits.train_source))
    subset = NamedSubset(splits.train, names, config.train_list)
    return DataSplits(subset, splits.val, splits.class_map, subset)  # type: ignore[arg-type]


def _build_datasets(config: DataConfig, seed: int) -> DataSplits:
    val, class_map = build_eval_dataset(config)
    if config.dataset == "synthetic":
        train = SyntheticShapes(
            num_images=config.synthetic_train_images,
            size=config.synthetic_size,
            num_classes=config.synthetic_classes,
            seed=config.synthetic_seed,
        )
        return DataSplits(train, val, class_map, train)
    root = Path(config.root or "")
    if config.dataset == "camvid":
        train = CamVid(root, split=config.train_split, resize=config.resize, on_error=config.on_error)
        return DataSplits(train, val, class_map, train)
    if config.dataset == "folder":
        train = FolderDataset(root / config.train_split, class_map, resize=config.resize, on_error=config.on_error)
        return DataSplits(train, val, class_map, train)
    tiles = AerialTiles(root, tiles=config.train_tiles, class_map=class_map)
    crops = RandomCropDataset(tiles, crop_size=config.tile_crop, samples_per_epoch=config.samples_per_epoch, seed=seed)
    return DataSplits(crops, val, class_map, tiles)


# ---------------------------------------------------------------------------------------------
# Exported models


def export_model(folder: Path, model: SegmentationModel, class_map: ClassMap, eval_config: EvalConfig,
                 extra: dict[str, Any] | None = None) -> None:
    """Save weights + description so ``load_model(folder)`` rebuilds the model for inference."""
    info = {
        "format": "labelwise-model/1",
        "labelwise_version": __version__,
        "model": model.config(),
        "class_map": class_map.to_dict(),
        "eval": to_dict(eval_config),
        **(extra or {}),
    }
    save_model(folder, model, info)


@dataclass
class LoadedModel:
    """A model rebuilt from an export, with what is needed to use it."""

    model: SegmentationModel
    class_map: ClassMap
    eval_config: EvalConfig
    info: dict[str, Any]


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild an exported model (a run folder or a folder holding model.json + model.safetensors)."""
    from labelwise.config import from_dict

    path = Path(path)
    info, weights = read_model_files(path)
    try:
        model_config = dict(info["model"])
        name = model_config.pop("name")
        num_classes = model_config.pop("num_classes")
        class_map = ClassMap.from_dict(info["class_map"], where=str(path / "model.json"))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: model.json lacks {exc}") from exc
    with skip_pretrained_weights():  # the export's own weights replace them at once
        model = create(name, num_classes=num_classes, **model_config)
    load_state_strict(model, weights, str(path))
    model.to(map_location).eval()
    eval_config = from_dict(EvalConfig, info.get("eval", {}), prefix="model.json eval.")
    return LoadedModel(model, class_map, eval_config, info)
