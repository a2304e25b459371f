"""Datasets from a :class:`~labelwise.config.DataConfig`: training and evaluation splits and their class map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from labelwise.config import DataConfig
from labelwise.data.aerial import AerialTiles, RandomCropDataset
from labelwise.data.camvid import CamVid
from labelwise.data.classmap import ClassMap
from labelwise.data.folder import FolderDataset
from labelwise.data.isprs import BANDS, IsprsTiles
from labelwise.data.splits import NamedSubset, dataset_names, read_name_list
from labelwise.data.synthetic import SyntheticShapes
from labelwise.errors import ConfigError


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
    if config.dataset in TILE_DATASETS:
        tiles: list[Any] = config.val_tiles if split == config.val_split else _parse_tiles(split, config.dataset)
        dataset = tile_dataset(config, tiles, evaluation=True)
        return dataset, dataset.class_map
    raise ConfigError(f"data.dataset: unknown dataset {config.dataset!r}")


#: Datasets of whole tiles, trained on random crops (``data.train_tiles`` / ``val_tiles``).
TILE_DATASETS = ("aerial", "isprs")


def tile_dataset(config: DataConfig, tiles: Sequence[int | str], evaluation: bool = False) -> AerialTiles | IsprsTiles:
    """Whole tiles ``tiles`` of an ``aerial`` or ``isprs`` dataset; ``evaluation`` reads the
    ISPRS eroded labels when ``config.eval_eroded``."""
    root = Path(config.root or "")
    if config.dataset == "isprs":
        class_map = ClassMap.from_json(config.class_map) if config.class_map else None
        return IsprsTiles(root, tiles=tiles, bands=config.bands, eroded=evaluation and config.eval_eroded,
                          class_map=class_map, on_error=config.on_error)
    if config.bands is not None:
        raise ConfigError(f"data.bands: only for the isprs dataset, the dataset is {config.dataset!r}")
    return AerialTiles(root, tiles=tiles, class_map=_class_map_for(config, root), on_error=config.on_error)


def data_channels(config: DataConfig) -> int:
    """Image channels the datasets of ``config`` yield: 4 for ISPRS ``RGBIR``, else 3."""
    return BANDS[config.bands] if config.dataset == "isprs" and config.bands else 3


def _parse_tiles(text: str, dataset: str) -> list[int | str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if dataset == "isprs":
        return list(parts)
    try:
        return [int(part) for part in parts]
    except ValueError as exc:
        raise ConfigError(f"split {text!r}: for aerial data give tile numbers, e.g. 6,7") from exc


def build_datasets(config: DataConfig, seed: int = 0) -> DataSplits:
    """Training and validation datasets described by ``config`` (the training split restricted
    to ``config.train_list`` when it is set)."""
    if config.train_list and config.dataset in TILE_DATASETS:
        raise ConfigError("data.train_list: aerial tiles are trained on random crops; choose the labeled tiles "
                          "with data.train_tiles")
    splits = build_full_datasets(config, seed)
    if not config.train_list:
        return splits
    names = read_name_list(config.train_list, dataset_names(splits.train_source))
    subset = NamedSubset(splits.train, names, config.train_list)
    return DataSplits(subset, splits.val, splits.class_map, subset)  # type: ignore[arg-type]


def build_full_datasets(config: DataConfig, seed: int = 0) -> DataSplits:
    """Like :func:`build_datasets`, ignoring ``config.train_list`` (the whole training split)."""
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
    tiles = tile_dataset(config, config.train_tiles)
    crops = RandomCropDataset(tiles, crop_size=config.tile_crop, samples_per_epoch=config.samples_per_epoch, seed=seed)
    return DataSplits(crops, val, class_map, tiles)
