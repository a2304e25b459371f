"""The ISPRS 2D semantic labelling benchmarks (Potsdam, Vaihingen) in their distributed layout.

Files are found by name anywhere under the dataset folder, so the archives can be unpacked as
they come (``2_Ortho_RGB/``, ``3_Ortho_IRRG/``, ``4_Ortho_RGBIR/``, ``5_Labels_all/``, the
``noBoundary`` label folder; Vaihingen's ``top/``, ``gts_for_participants/``,
``gts_eroded_for_participants/``) or all in one folder:

* Potsdam: ``top_potsdam_<id>_RGB.tif`` / ``_IRRG.tif`` / ``_RGBIR.tif`` (id such as ``2_10``),
  labels ``top_potsdam_<id>_label.tif`` and the eroded ``top_potsdam_<id>_label_noBoundary.tif``;
* Vaihingen: ``top_mosaic_09cm_area<n>.tif`` (IRRG); its label has the same file name inside a
  folder whose name holds ``gt`` or ``label``, the eroded one ends in ``_noBoundary.tif``.

Labels are colour-coded: impervious surfaces white, building blue, low vegetation cyan, tree
green, car yellow, clutter red (:data:`ISPRS_CLASSES`); black, the boundary band of the eroded
labels, is ignored. ``eroded=True`` (the benchmark's evaluation protocol) reads the eroded labels
where a tile has them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from labelwise.data.classmap import ClassMap
from labelwise.data.folder import OnError, PairedFilesDataset, Problem, resize_mask, size_mismatch
from labelwise.data.io import read_bands, read_label
from labelwise.errors import DataError

ISPRS_CLASSES = ClassMap.from_dict({
    "classes": ["impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter"],
    "colors": ["#FFFFFF", "#0000FF", "#00FFFF", "#00FF00", "#FFFF00", "#FF0000"],
    "ignore_colors": ["#000000"],
})

#: Band combinations of the ISPRS orthophotos and how many channels each has.
BANDS = {"RGB": 3, "IRRG": 3, "RGBIR": 4}

_POTSDAM = re.compile(r"top_potsdam_(\d+_\d+)_(RGB|IRRG|RGBIR|label|label_noBoundary)\.tif", re.IGNORECASE)
_VAIHINGEN = re.compile(r"top_mosaic_09cm_area(\d+)(_noBoundary)?\.tif", re.IGNORECASE)
_LABEL_FOLDER = re.compile(r"gt|label", re.IGNORECASE)


@dataclass
class IsprsTile:
    """The files of one ISPRS tile: an image per band combination, its label, its eroded label."""

    tile_id: str
    images: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None
    eroded: Path | None = None


def _add(tiles: dict[str, IsprsTile], tile_id: str, slot: str, path: Path) -> None:
    tile = tiles.setdefault(tile_id, IsprsTile(tile_id))
    current = tile.images.get(slot) if slot in BANDS else getattr(tile, slot)
    if current is not None:
        raise DataError(f"{path}: tile {tile_id} already has this file at {current}; keep one copy")
    if slot in BANDS:
        tile.images[slot] = path
    else:
        setattr(tile, slot, path)


def discover_isprs(root: str | Path) -> tuple[str, dict[str, IsprsTile]]:
    """The layout (``"potsdam"`` or ``"vaihingen"``) and the tiles under ``root``, by id.

    Raises:
        DataError: ``root`` is missing, holds no ISPRS file, or holds both layouts.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ISPRS dataset folder not found")
    potsdam: dict[str, IsprsTile] = {}
    vaihingen: dict[str, IsprsTile] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        if match := _POTSDAM.fullmatch(path.name):
            kind = match.group(2)
            slot = {"label": "label", "label_noboundary": "eroded"}.get(kind.lower(), kind.upper())
            _add(potsdam, match.group(1), slot, path)
        elif match := _VAIHINGEN.fullmatch(path.name):
            in_label_folder = any(_LABEL_FOLDER.search(part) for part in path.relative_to(root).parts[:-1])
            slot = "eroded" if match.group(2) else "label" if in_label_folder else "IRRG"
            _add(vaihingen, match.group(1), slot, path)
    if potsdam and vaihingen:
        raise DataError(f"{root}: holds both Potsdam and Vaihingen tiles; give one dataset folder each")
    if not potsdam and not vaihingen:
        raise DataError(f"{root}: no ISPRS tiles (top_potsdam_<id>_RGB.tif / _label.tif or "
                        "top_mosaic_09cm_area<n>.tif files, searched recursively)")
    return ("potsdam", potsdam) if potsdam else ("vaihingen", vaihingen)


def _natural(tile_id: str) -> list[int]:
    return [int(part) for part in tile_id.split("_")]


class IsprsTiles(PairedFilesDataset):
    """Whole ISPRS Potsdam / Vaihingen tiles (module docstring) as image/label pairs.

    Args:
        root: the dataset folder (searched recursively).
        tiles: tile ids to use (Potsdam ``"2_10"``, Vaihingen ``1`` or ``"1"``); ``None``: every
            tile that has an image of ``bands`` and a label.
        bands: ``"RGB"``, ``"IRRG"`` or ``"RGBIR"`` (4 channels); ``None``: RGB for Potsdam, IRRG
            for Vaihingen.
        eroded: read the eroded (``noBoundary``) labels where a tile has them (the benchmark's
            evaluation masks; black boundary pixels are ignored).
        class_map: the six ISPRS classes by default.
        resize, on_error: as for :class:`~labelwise.data.folder.FolderDataset`.

    Items are whole tiles: image float32 ``[C, H, W]`` in [0, 1] (C = 3, or 4 for RGBIR),
    mask int64 ``[H, W]``; names are the tile ids.
    """

    def __init__(self, root: str | Path, tiles: Sequence[int | str] | None = None, bands: str | None = None,
                 eroded: bool = False, class_map: ClassMap | None = None, resize: tuple[int, int] | None = None,
                 on_error: OnError = "raise") -> None:
        self.root = Path(root)
        self.layout, found = discover_isprs(self.root)
        self.bands = (bands or ("RGB" if self.layout == "potsdam" else "IRRG")).upper()
        if self.bands not in BANDS:
            raise DataError(f"{self.root}: bands must be one of {sorted(BANDS)}, got {bands!r}")
        self.channels = BANDS[self.bands]
        self.eroded = eroded
        if tiles is None:
            wanted = sorted((t for t in found.values() if self.bands in t.images and (t.label or t.eroded)),
                            key=lambda t: _natural(t.tile_id))
            if not wanted:
                raise DataError(f"{self.root}: no {self.layout} tile has both a {self.bands} image and a label")
        else:
            missing = [str(t) for t in tiles if str(t) not in found]
            if missing:
                raise DataError(f"{self.root}: no {self.layout} tile(s) {missing}; available: "
                                f"{sorted(found, key=_natural)}")
            wanted = [found[str(t)] for t in tiles]
        pairs: list[tuple[Path, Path]] = []
        names: list[str] = []
        problems: list[Problem] = []
        for tile in wanted:
            image = tile.images.get(self.bands)
            label = (tile.eroded or tile.label) if eroded else (tile.label or tile.eroded)
            if image is None or label is None:
                what = f"no {self.bands} image" if image is None else "no label"
                anchor = image or label or next(iter(tile.images.values()))
                problems.append(Problem(anchor, what, f"{anchor}: tile {tile.tile_id} has {what}"))
                continue
            pairs.append((image, label))
            names.append(tile.tile_id)
        self.tiles = names
        self._setup(pairs, problems, class_map or ISPRS_CLASSES, resize, on_error, str(self.root), names)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Tile ``index`` as (uint8 ``[H, W, C]``, int64 ``[H, W]``)."""
        if self.channels == 3:
            return super().load_pair(index)
        image_path, mask_path = self.pairs[index]
        image = read_bands(image_path, self.channels)
        mask = read_label(mask_path, self.class_map)
        if image.shape[:2] != mask.shape:
            raise DataError(size_mismatch(image_path, mask_path, image.shape[:2], mask.shape))
        if self.resize is not None:
            height, width = self.resize
            image = np.stack([np.asarray(Image.fromarray(image[..., c]).resize((width, height), Image.BILINEAR))
                              for c in range(self.channels)], axis=2)
            mask = resize_mask(mask, self.resize)
        return image, mask
