"""Class names, display colors and the ignore value of one dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from labelwise.errors import DataError

RGB = tuple[int, int, int]


def parse_color(value: Any, where: str) -> RGB:
    """Parse ``"#RRGGBB"`` or ``[r, g, b]`` into an ``(r, g, b)`` tuple of ints in [0, 255]."""
    if isinstance(value, str):
        text = value.lstrip("#")
        if len(text) != 6:
            raise DataError(f"{where}: color {value!r} is not of the form #RRGGBB")
        try:
            return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
        except ValueError as exc:
            raise DataError(f"{where}: color {value!r} is not hexadecimal") from exc
    if isinstance(value, (list, tuple)) and len(value) == 3:
        rgb = tuple(int(v) for v in value)
        if all(0 <= v <= 255 for v in rgb):
            return rgb  # type: ignore[return-value]
    raise DataError(f"{where}: color {value!r} must be '#RRGGBB' or [r, g, b] with values 0-255")


def default_palette(num_classes: int) -> list[RGB]:
    """Distinct display colors for ``num_classes`` classes (the PASCAL VOC bit pattern)."""
    colors: list[RGB] = []
    for index in range(1, num_classes + 1):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colors.append((r, g, b))
    return colors


@dataclass(frozen=True)
class ClassMap:
    """Names, display colors and ignore conventions of a dataset's classes.

    Attributes:
        names: one name per class; class id ``i`` is ``names[i]``.
        colors: one ``(r, g, b)`` display color per class; for color-coded masks these are
            also the colors that encode the classes on disk.
        ignore_index: the mask value of pixels that carry no label (excluded from losses and
            metrics). For class-id PNGs whose "unlabeled" value differs (CamVid: 11), set
            ``label_ignore_values`` and the loader remaps them to ``ignore_index``.
        ignore_colors: colors of color-coded masks that mean "ignore this pixel".
        label_ignore_values: class-id PNG values (besides ``ignore_index``) that mean "ignore".
    """

    names: tuple[str, ...]
    colors: tuple[RGB, ...]
    ignore_index: int = 255
    ignore_colors: tuple[RGB, ...] = ()
    label_ignore_values: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.names) == 0:
            raise DataError("ClassMap: at least one class name is required")
        if len(self.colors) != len(self.names):
            raise DataError(
                f"ClassMap: {len(self.names)} names but {len(self.colors)} colors; give one color per class"
            )
        if len(set(self.colors)) != len(self.colors):
            raise DataError("ClassMap: two classes share a color, so color-coded masks would be ambiguous")
        if set(self.colors) & set(self.ignore_colors):
            raise DataError("ClassMap: a color is declared both as a class and as ignore")
        if 0 <= self.ignore_index < len(self.names):
            raise DataError(
                f"ClassMap: ignore_index {self.ignore_index} collides with class id of {self.names[self.ignore_index]!r}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @classmethod
    def from_names(cls, names: Sequence[str], ignore_index: int = 255) -> "ClassMap":
        """A class map with default display colors."""
        return cls(tuple(names), tuple(default_palette(len(names))), ignore_index=ignore_index)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "class map") -> "ClassMap":
        """Build from a mapping with keys ``classes`` (or ``names``), ``colors``, optional
        ``ignore_index`` and ``ignore_colors``.

        A dataset whose unlabeled value lies inside the 8-bit range right after the classes
        (CamVid: ``ignore_index`` 11 with 11 classes) keeps that value as a label value to
        ignore and uses 255 as the tensor ignore index, so that every dataset shares one ignore
        convention downstream.
        """
        known = {"classes", "names", "colors", "ignore_index", "ignore_colors", "label_format"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        names = data.get("classes", data.get("names"))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{where}: 'classes' must be a list of class names")
        raw_colors = data.get("colors")
        colors = (
            [parse_color(c, f"{where}: colors[{i}]") for i, c in enumerate(raw_colors)]
            if raw_colors is not None
            else default_palette(len(names))
        )
        ignore_colors = tuple(
            parse_color(c, f"{where}: ignore_colors[{i}]") for i, c in enumerate(data.get("ignore_colors", []))
        )
        file_ignore = int(data.get("ignore_index", 255))
        label_ignore: tuple[int, ...] = ()
        ignore_index = file_ignore
        if file_ignore != 255:
            label_ignore = (file_ignore,)
            ignore_index = 255
        return cls(tuple(names), tuple(colors), ignore_index, ignore_colors, label_ignore)

    @classmethod
    def from_json(cls, path: str | Path) -> "ClassMap":
        """Read a ``classes.json`` (the layout of ``../shared/data/*/classes.json``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise DataError(f"{path}: class map file not found") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read class map: {exc}") from exc
        if not isinstance(data, dict):
            raise DataError(f"{path}: class map must be a JSON object")
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``from_dict(to_dict())`` round-trips."""
        out: dict[str, Any] = {
            "classes": list(self.names),
            "colors": ["#%02X%02X%02X" % c for c in self.colors],
            "ignore_index": self.ignore_index,
        }
        if self.ignore_colors:
            out["ignore_colors"] = ["#%02X%02X%02X" % c for c in self.ignore_colors]
        return out

    def palette(self) -> np.ndarray:
        """Display colors as a ``[num_classes, 3]`` uint8 array."""
        return np.asarray(self.colors, dtype=np.uint8).reshape(-1, 3)

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """Class-id mask ``[H, W]`` → RGB ``[H, W, 3]`` uint8; ignore and out-of-range ids are black."""
        mask = np.asarray(mask)
        table = np.zeros((256, 3), dtype=np.uint8)
        table[: self.num_classes] = self.palette()
        return table[np.clip(mask, 0, 255).astype(np.int64)] * (mask < self.num_classes)[..., None].astype(np.uint8)
