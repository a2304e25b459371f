"""Training samples of semi-supervised runs: labeled samples paired with unlabeled images.

- :func:`unlabeled_images`: the unlabeled part of a :class:`~.config.SemiConfig`: the image
  folders of ``semi.unlabeled``, the training-split samples named in ``semi.unlabeled_list``, or
  random crops of the aerial tiles ``semi.unlabeled_tiles``, the last two seen through
  :class:`ImagesOnly` (their masks are dropped on read, so no label of the unlabeled part can
  reach training; crops that overhang a small tile carry ``valid``, the tile's pixels, from the
  crop position).
- :class:`LabeledUnlabeledPairs`: an epoch runs over the unlabeled images once; sample ``i``
  pairs unlabeled image ``i`` with a labeled sample drawn by a per-epoch permutation of the
  labeled set (cycled when it is smaller), seeded by ``(seed, epoch)`` so resumed runs see the
  same pairs.
- :func:`pair_collate`: the labeled half through :func:`~labelwise.data.pad_collate` (keys
  ``image``, ``mask``, ``name``), the unlabeled half padded likewise (``image_u``, ``valid_u``
  marks the real pixels: not the collate's padding, nor a crop's padding outside its tile,
  ``name_u``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from labelwise.data import RandomCropDataset, pad_collate
from labelwise.data.build import TILE_DATASETS, DataSplits, build_full_datasets, tile_dataset
from labelwise.data.images import ImageFolderDataset
from labelwise.data.splits import NamedSubset, dataset_names, read_name_list
from labelwise.data.wide_context import WideContextCrops
from labelwise.errors import DataError
from labelwise.methods.semi.config import SemiConfig

__all__ = ["ImagesOnly", "LabeledUnlabeledPairs", "pair_collate", "unlabeled_images", "unlabeled_tiles"]


class ImagesOnly(Dataset):
    """``{"image", "name"}`` of every sample of ``source``; any mask is dropped. Sources with an
    ``inside(index)`` method (:class:`~labelwise.data.RandomCropDataset`) add ``"valid"``, bool
    ``[H, W]``: True on real image pixels, False on the crop's zero padding."""

    def __init__(self, source: Dataset) -> None:
        self.source = source
        self.names = dataset_names(source)

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the source, so that random crops change with the epoch."""
        setter = getattr(self.source, "set_epoch", None)
        if setter is not None:
            setter(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.source[index]
        item: dict[str, Any] = {"image": sample["image"], "name": str(sample["name"])}
        inside = getattr(self.source, "inside", None)
        if callable(inside):
            item["valid"] = torch.from_numpy(inside(index))
        return item


def unlabeled_tiles(config: SemiConfig) -> Dataset:
    """The whole tiles ``semi.unlabeled_tiles`` (a tile set whose masks training must not read).

    Raises:
        DataError: not a tile dataset, or a tile that is also labeled.
    """
    if config.data.dataset not in TILE_DATASETS:
        raise DataError(f"semi.unlabeled_tiles: only for tile datasets {TILE_DATASETS}, the dataset is "
                        f"{config.data.dataset!r}")
    labeled = {str(t) for t in config.data.train_tiles}
    overlap = [t for t in config.semi.unlabeled_tiles if str(t) in labeled]
    if overlap:
        raise DataError(f"semi.unlabeled_tiles: tiles {overlap} are also labeled (data.train_tiles)")
    return tile_dataset(config.data, config.semi.unlabeled_tiles)


def unlabeled_images(config: SemiConfig, labeled_names: Sequence[str], context_scale: float | None = None) -> Dataset:
    """The unlabeled images of ``config`` (module docstring). A name that is also labeled is an
    error naming the list file (the two parts must be disjoint). ``context_scale`` (a
    wide-context student): the crops of ``semi.unlabeled_tiles`` carry their contexts
    (:class:`~labelwise.data.wide_context.WideContextCrops`, images ``[2C, h, w]``)."""
    if config.semi.unlabeled:
        return ImagesOnly(ImageFolderDataset(config.semi.unlabeled, on_error=config.data.on_error))
    if config.semi.unlabeled_tiles:
        tiles = unlabeled_tiles(config)
        crops = RandomCropDataset(tiles, crop_size=config.data.tile_crop,
                                  samples_per_epoch=config.data.samples_per_epoch, seed=config.seed + 1)
        return ImagesOnly(crops if context_scale is None else WideContextCrops(crops, context_scale))
    assert config.semi.unlabeled_list is not None
    data = config.data
    full: DataSplits = build_full_datasets(data, config.seed)
    names = read_name_list(config.semi.unlabeled_list, dataset_names(full.train_source))
    overlap = sorted(set(names) & set(labeled_names))
    if overlap:
        raise DataError(f"{config.semi.unlabeled_list}: {len(overlap)} unlabeled name(s) are also in the labeled "
                        f"list {data.train_list}: {overlap[:5]}")
    return ImagesOnly(NamedSubset(full.train_source, names, config.semi.unlabeled_list))


class LabeledUnlabeledPairs(Dataset):
    """Unlabeled image ``i`` with a labeled sample (module docstring)."""

    def __init__(self, labeled: Dataset, unlabeled: Dataset, seed: int = 0) -> None:
        if len(labeled) == 0 or len(unlabeled) == 0:  # type: ignore[arg-type]
            raise DataError(f"semi-supervised training needs labeled and unlabeled images, got "
                            f"{len(labeled)} and {len(unlabeled)}")  # type: ignore[arg-type]
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        count = len(self.labeled)  # type: ignore[arg-type]
        rounds = -(-len(self) // count)
        rng = np.random.default_rng([self.seed, epoch, 17])
        self.order = np.concatenate([rng.permutation(count) for _ in range(rounds)])[:len(self)]
        for part in (self.labeled, self.unlabeled):
            setter = getattr(part, "set_epoch", None)
            if setter is not None:
                setter(epoch)

    def __len__(self) -> int:
        return len(self.unlabeled)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        labeled = dict(self.labeled[int(self.order[index])])
        unlabeled = self.unlabeled[index]
        labeled["image_u"] = unlabeled["image"]
        labeled["name_u"] = str(unlabeled["name"])
        if "valid" in unlabeled:
            labeled["valid_u"] = unlabeled["valid"]
        return labeled


def pair_collate(samples: Sequence[dict[str, Any]], ignore_index: int = 255) -> dict[str, Any]:
    """Batch of :class:`LabeledUnlabeledPairs` items (module docstring)."""
    labeled = [{k: v for k, v in s.items() if k not in ("image_u", "name_u", "valid_u")} for s in samples]
    batch = pad_collate(labeled, ignore_index=ignore_index)  # type: ignore[arg-type]
    images = [s["image_u"] for s in samples]
    height = max(int(i.shape[-2]) for i in images)
    width = max(int(i.shape[-1]) for i in images)
    padded, valid = [], []
    for sample, image in zip(samples, images):
        pad = (0, width - image.shape[-1], 0, height - image.shape[-2])
        padded.append(F.pad(image, pad, value=0.0))
        real = sample.get("valid_u")
        if real is None:
            real = torch.ones(image.shape[-2:], dtype=torch.bool)
        valid.append(F.pad(real, pad, value=False))
    batch["image_u"] = torch.stack(padded)
    batch["valid_u"] = torch.stack(valid)
    batch["name_u"] = [s["name_u"] for s in samples]
    return batch
