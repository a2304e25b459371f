"""Image-level labels ("tags"): which classes appear in each image, the input of weak supervision.

A tag file maps image names (an image's path relative to its folder, without the extension, as
the image datasets name their samples: ``0001TP_006690``, ``sub/img_01``) to class names:

* JSON: ``{"0001TP_006690": ["car", "road", "sky"], ...}`` (optionally under an ``"images"``
  key);
* CSV: a header ``image,tags`` then one row per image, the tags separated by ``;`` (or ``|``),
  e.g. ``0001TP_006690,car;road;sky``.

:func:`read_tag_file` validates it against the class map and, when given, the images it must
describe; every problem is a :class:`~labelwise.errors.DataError` naming the file, the entry (the
CSV line) and what is wrong: an unknown class name, an entry without tags, a duplicate entry,
tags for an image that is not there, an image without an entry. :func:`tags_from_masks` derives
tags from label masks instead (for benchmarks): a class is present in an image when it covers
at least ``min_fraction`` of the image's labeled pixels.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from labelwise.data.classmap import ClassMap
from labelwise.errors import DataError
from labelwise.io.atomic import atomic_write_json

__all__ = ["ImageTags", "read_tag_file", "tags_from_dataset", "tags_from_masks"]

_TAG_SEPARATORS = re.compile(r"[;|]")


@dataclass(frozen=True)
class ImageTags:
    """Tags of a set of images: ``present[i, c]`` is True when class ``c`` appears in image
    ``names[i]`` (bool ``[N, C]``, C = ``len(class_names)``)."""

    names: list[str]
    present: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.present.shape != (len(self.names), len(self.class_names)) or self.present.dtype != np.bool_:
            raise ValueError(f"present must be bool [{len(self.names)}, {len(self.class_names)}], "
                             f"got {self.present.dtype} {list(self.present.shape)}")

    def __len__(self) -> int:
        return len(self.names)

    def index(self) -> dict[str, int]:
        """``name -> row``."""
        return {name: i for i, name in enumerate(self.names)}

    def for_names(self, names: Sequence[str]) -> np.ndarray:
        """bool ``[len(names), C]`` in the order of ``names``; ``KeyError`` naming a missing one."""
        rows = self.index()
        missing = [n for n in names if n not in rows]
        if missing:
            raise KeyError(f"no tags for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return self.present[[rows[n] for n in names]]

    def to_dict(self) -> dict[str, list[str]]:
        return {name: [self.class_names[c] for c in np.flatnonzero(row)] for name, row in zip(self.names, self.present)}

    def save(self, path: str | Path) -> Path:
        """Write the JSON form (atomically); :func:`read_tag_file` reads it back."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is allowed); DataError naming the file otherwise."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                        "save the tag file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the tag file ({exc.strerror})") from exc


def _entries_from_json(path: Path) -> list[tuple[str, str, Any]]:
    try:
        data = json.loads(_read_text(path))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"images"} and isinstance(data["images"], dict):
        data = data["images"]
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object mapping image name -> list of class names")
    return [(f"entry {name!r}", str(name), tags) for name, tags in data.items()]


def _entries_from_csv(path: Path) -> list[tuple[str, str, Any]]:
    try:
        rows = list(csv.reader(io.StringIO(_read_text(path), newline="")))
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: empty tag file")
    header = [cell.strip().lower() for cell in rows[0]]
    if header[:2] != ["image", "tags"]:
        raise DataError(f"{path}: line 1: expected the header 'image,tags', got {','.join(rows[0])!r}")
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise DataError(f"{path}: line {line}: expected 2 columns (image,tags), got {len(row)}")
        tags = [t.strip() for t in _TAG_SEPARATORS.split(row[1]) if t.strip()]
        entries.append((f"line {line}", row[0].strip(), tags))
    return entries


def read_tag_file(path: str | Path, class_map: ClassMap, image_names: Sequence[str] | None = None) -> ImageTags:
    """Read and validate a tag file (module docstring).

    Args:
        path: ``.json`` or ``.csv`` file.
        class_map: the classes the names must come from.
        image_names: the images the file must describe, exactly (each needs an entry, and no
            entry may name another image); ``None`` accepts the file's own list.

    Returns:
        :class:`ImageTags` in the order of ``image_names`` (or of the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tag file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        entries = _entries_from_json(path)
    elif suffix == ".csv":
        entries = _entries_from_csv(path)
    else:
        raise DataError(f"{path}: unknown tag file type {path.suffix!r} (use .json or .csv)")
    class_index = {name: i for i, name in enumerate(class_map.names)}
    rows: dict[str, np.ndarray] = {}
    for where, name, tags in entries:
        if not name:
            raise DataError(f"{path}: {where}: empty image name")
        if name in rows:
            raise DataError(f"{path}: {where}: image {name!r} appears twice")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DataError(f"{path}: {where}: tags must be a list of class names, got {tags!r}")
        if not tags:
            raise DataError(f"{path}: {where}: image {name!r} has no tags (every image needs at least one class)")
        row = np.zeros(len(class_map.names), dtype=bool)
        for tag in tags:
            if tag not in class_index:
                raise DataError(f"{path}: {where}: unknown class {tag!r} for image {name!r} "
                                f"(classes: {', '.join(class_map.names)})")
            row[class_index[tag]] = True
        rows[name] = row
    if image_names is None:
        names = list(rows)
    else:
        names = list(image_names)
        known = set(names)
        extra = [n for n in rows if n not in known]
        if extra:
            raise DataError(f"{path}: tags for {len(extra)} image(s) that are not among the images: "
                            f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
        untagged = [n for n in names if n not in rows]
        if untagged:
            raise DataError(f"{path}: {len(untagged)} image(s) have no entry: "
                            f"{untagged[:5]}{' ...' if len(untagged) > 5 else ''}")
    if not names:
        raise DataError(f"{path}: no entries")
    present = np.stack([rows[n] for n in names])
    return ImageTags(names, present, list(class_map.names))


def tags_from_masks(masks: Tensor, num_classes: int, min_fraction: float = 0.01,
                    ignore_index: int = 255) -> Tensor:
    """Classes present in each mask of a batch.

    Args:
        masks: long ``[B, H, W]`` class ids; ``ignore_index`` (and any id outside
            ``[0, num_classes)``) is not a labeled pixel.
        min_fraction: a class is present when it covers at least this fraction of the image's
            labeled pixels (0 < fraction <= 1).

    Returns:
        bool ``[B, num_classes]``; an image without labeled pixels has no class.
    """
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    if masks.dim() != 3:
        raise ValueError(f"masks must be [B, H, W], got {list(masks.shape)}")
    b = masks.shape[0]
    flat = masks.reshape(b, -1).long()
    valid = (flat >= 0) & (flat < num_classes) & (flat != ignore_index)
    offsets = torch.arange(b, device=masks.device)[:, None] * num_classes
    counts = torch.bincount((flat + offsets)[valid], minlength=b * num_classes).view(b, num_classes)
    labeled = counts.sum(1, keepdim=True)
    return (counts > 0) & (counts >= min_fraction * labeled)


def tags_from_dataset(dataset: Iterable[dict[str, Any]] | Any, class_map: ClassMap, min_fraction: float = 0.01
                      ) -> ImageTags:
    """Tags derived from the masks of a labeled dataset (samples ``{"mask": [H, W], "name"}``);
    images are read one at a time (they may differ in size)."""
    names, rows = [], []
    for index in range(len(dataset)):
        sample = dataset[index]
        present = tags_from_masks(torch.as_tensor(sample["mask"])[None], class_map.num_classes, min_fraction,
                                  class_map.ignore_index)[0]
        names.append(str(sample["name"]))
        rows.append(present.numpy())
    if not names:
        raise DataError("tags_from_dataset: the dataset is empty")
    return ImageTags(names, np.stack(rows), list(class_map.names))
