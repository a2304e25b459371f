"""Reading images and label masks from disk, with errors that name the file and the problem.

Label files come in two encodings, both handled by :func:`read_label`:

* **class-id masks**: single-channel 8/16-bit images (PIL modes ``L``, ``I;16``, ``I``) whose
  pixel value is the class id. Values in ``class_map.label_ignore_values`` or equal to
  ``class_map.ignore_index`` become ``ignore_index``; any other value ``>= num_classes`` is an
  error.
* **color-coded masks**: RGB (or RGBA, alpha dropped) images whose colors are
  ``class_map.colors``; ``class_map.ignore_colors`` become ``ignore_index``; any other color is
  an error that names it as ``#RRGGBB`` with its pixel count.

Palette (``P``) PNGs are ambiguous, so this rule decides (see :func:`palette_is_color_coded`):
a palette mask is color-coded when every palette entry its pixels use is a class or ignore
color; otherwise, when every index it uses is a valid class id or ignore value, the indices
are class ids; when neither holds, the reading with more valid pixels wins and the error is
reported in that reading (so a color-coded mask with one stray color names that color).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from labelwise.data.classmap import ClassMap
from labelwise.data.preflight import exif_orientation, open_header, oriented_size, upright
from labelwise.errors import DataError

#: Largest number of distinct offending values / colors spelled out in an error message.
MAX_REPORTED = 8

_ID_MODES = {"L", "I;16", "I;16L", "I;16B", "I", "1"}


def _open(path: Path) -> Image.Image:
    """Open ``path``, decode its pixels fully and apply its EXIF orientation; any failure becomes
    a :class:`DataError`."""
    img = open_header(path)
    try:
        img.load()  # decode now, so truncated or corrupt data fails here and not later
        orientation = exif_orientation(img)
        if orientation != 1:
            turned = upright(img, orientation)
            img.close()
            img = turned
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types on corrupt data
        img.close()
        raise DataError(f"{path}: cannot decode image ({exc}); the file is truncated or corrupt") from exc
    return img


def image_size(path: str | Path) -> tuple[int, int]:
    """Displayed ``(H, W)`` of an image file from its header only (EXIF orientation applied;
    pixels are not decoded)."""
    with open_header(Path(path)) as img:
        return oriented_size(img)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Returns:
        uint8 array ``[H, W, 3]``. Grey, grey+alpha, RGBA, CMYK and palette images are converted
        to RGB (alpha is dropped).

    Raises:
        DataError: the file is missing, not an image, truncated or corrupt (message names it).
    """
    path = Path(path)
    img = _open(path)
    try:
        if img.mode == "I;16" or img.mode.startswith("I;16") or img.mode in {"I", "F"}:
            arr = np.asarray(img, dtype=np.float64)
            top = float(arr.max()) or 1.0
            grey = np.clip(arr * (255.0 / max(top, 255.0)), 0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        rgb = img.convert("RGB") if img.mode != "RGB" else img
        out = np.array(rgb, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only)
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types on corrupt data
        raise DataError(f"{path}: cannot convert image to RGB ({exc})") from exc
    finally:
        img.close()
    if out.ndim != 3 or out.shape[2] != 3:
        raise DataError(f"{path}: expected an RGB image, got array of shape {out.shape}")
    return np.ascontiguousarray(out)


def read_bands(path: str | Path, channels: int) -> np.ndarray:
    """Read a multi-band image (e.g. a 4-band RGBIR orthophoto) as uint8 ``[H, W, channels]``;
    a 3-band file is read as RGB.

    Raises:
        DataError: unreadable file, or a band count other than ``channels``.
    """
    path = Path(path)
    if channels == 3:
        return read_image(path)
    img = open_header(path)
    try:
        img.load()
        array = np.array(img)  # a writable copy (torch.from_numpy warns on read-only arrays)
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types on corrupt data
        raise DataError(f"{path}: cannot decode image ({exc}); the file is truncated or corrupt") from exc
    finally:
        img.close()
    if array.ndim != 3 or array.shape[2] != channels:
        found = 1 if array.ndim == 2 else array.shape[2]
        raise DataError(f"{path}: {found} band(s), expected {channels}")
    if array.dtype != np.uint8:
        raise DataError(f"{path}: {array.dtype} bands, expected 8-bit")
    return np.ascontiguousarray(array)


def read_label(path: str | Path, class_map: ClassMap) -> np.ndarray:
    """Read a label mask (class-id or color-coded; see the module docstring for the rule).

    Returns:
        int64 array ``[H, W]`` of class ids in ``[0, num_classes)`` or ``class_map.ignore_index``.

    Raises:
        DataError: unreadable file, a class id ``>= num_classes`` that is not an ignore value
            (message gives the values and their pixel counts), or an unknown color (message
            gives ``#RRGGBB`` and pixel counts).
    """
    path = Path(path)
    img = _open(path)
    try:
        mode = img.mode
        if mode == "P":
            return _read_palette_label(path, img, class_map)
        if mode in _ID_MODES:
            return ids_to_labels(np.asarray(img), class_map, where=str(path))
        if mode == "LA":
            return ids_to_labels(np.asarray(img.getchannel("L")), class_map, where=str(path))
        rgb = np.asarray(img.convert("RGB") if mode != "RGB" else img, dtype=np.uint8)
        return colors_to_labels(rgb, class_map, where=str(path))
    finally:
        img.close()


# ----------------------------------------------------------------------------- class ids


@lru_cache(maxsize=32)
def _id_table(class_map: ClassMap, size: int) -> np.ndarray:
    """Lookup table value → label for values ``0..size-1``; -1 marks invalid values."""
    table = np.full(size, -1, dtype=np.int64)
    table[: min(class_map.num_classes, size)] = np.arange(min(class_map.num_classes, size))
    for value in (*class_map.label_ignore_values, class_map.ignore_index):
        if 0 <= value < size:
            table[value] = class_map.ignore_index
    table.setflags(write=False)
    return table


def ids_to_labels(values: np.ndarray, class_map: ClassMap, where: str = "mask") -> np.ndarray:
    """Map raw class-id values ``[H, W]`` (any integer dtype) to int64 labels.

    Ignore values become ``ignore_index``; any other value outside ``[0, num_classes)`` raises a
    DataError naming ``where``, the offending values and their pixel counts.
    """
    values = np.asarray(values)
    if values.dtype == bool:
        values = values.astype(np.uint8)
    if not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"{where}: class-id mask must hold integers, got dtype {values.dtype}")
    if values.size == 0:
        return values.astype(np.int64)
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high < 65536:
        table = _id_table(class_map, max(256, high + 1))
        labels = table[values]
        bad = labels < 0
    else:
        ignore = np.isin(values, (*class_map.label_ignore_values, class_map.ignore_index))
        bad = ~ignore & ((values < 0) | (values >= class_map.num_classes))
        labels = np.where(ignore, class_map.ignore_index, values).astype(np.int64)
    if bad.any():
        found, counts = np.unique(values[bad], return_counts=True)
        raise DataError(f"{where}: {_invalid_ids_message(found, counts, class_map)}")
    return labels


def _invalid_ids_message(found: np.ndarray, counts: np.ndarray, class_map: ClassMap) -> str:
    order = np.argsort(-counts, kind="stable")[:MAX_REPORTED]
    listed = ", ".join(f"{int(found[i])} ({int(counts[i])} px)" for i in order)
    more = f" and {len(found) - len(order)} more value(s)" if len(found) > len(order) else ""
    ignores = sorted({*class_map.label_ignore_values, class_map.ignore_index})
    return (
        f"invalid class id(s) {listed}{more}: {int(counts.sum())} pixel(s) >= num_classes "
        f"{class_map.num_classes} and not an ignore value {ignores}"
    )


# ----------------------------------------------------------------------------- colors


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """``[..., 3]`` uint8 colors → ``[...]`` uint32 keys ``r << 16 | g << 8 | b``."""
    rgb = np.asarray(rgb)
    keys = rgb[..., 0].astype(np.uint32)
    keys <<= 8
    keys |= rgb[..., 1]
    keys <<= 8
    keys |= rgb[..., 2]
    return keys


@lru_cache(maxsize=32)
def _color_table(class_map: ClassMap) -> tuple[np.ndarray, np.ndarray]:
    """Sorted color keys of classes and ignore colors, and the label of each key."""
    keys = [pack_rgb(np.asarray(c, dtype=np.uint8)) for c in class_map.colors]
    labels = list(range(class_map.num_classes))
    for color in class_map.ignore_colors:
        keys.append(pack_rgb(np.asarray(color, dtype=np.uint8)))
        labels.append(class_map.ignore_index)
    key_arr = np.asarray(keys, dtype=np.uint32)
    label_arr = np.asarray(labels, dtype=np.int64)
    order = np.argsort(key_arr)
    key_arr, label_arr = key_arr[order], label_arr[order]
    key_arr.setflags(write=False)
    label_arr.setflags(write=False)
    return key_arr, label_arr


@lru_cache(maxsize=4)
def _color_codes(class_map: ClassMap) -> tuple[np.ndarray, np.ndarray] | None:
    """A 2**24-entry uint8 table color key → code (0: unknown color, k: the k-th known
    color) and the label of each code; ``None`` when there are more than 255 known colors."""
    known, labels = _color_table(class_map)
    if len(known) > 255:
        return None
    codes = np.zeros(1 << 24, dtype=np.uint8)
    codes[known] = np.arange(1, len(known) + 1, dtype=np.uint8)
    code_labels = np.concatenate([[-1], labels]).astype(np.int64)
    codes.setflags(write=False)
    code_labels.setflags(write=False)
    return codes, code_labels


def _lookup_keys(keys: np.ndarray, class_map: ClassMap) -> tuple[np.ndarray, np.ndarray]:
    """Labels of packed color ``keys`` and a boolean array of unknown colors.

    Large arrays use a cached 16 MB table lookup (one gather per pixel); small ones (palettes)
    a binary search in the sorted known colors.
    """
    table = _color_codes(class_map) if keys.size > 4096 else None
    if table is not None:
        codes = table[0][keys]
        return table[1][codes], codes == 0
    known, labels = _color_table(class_map)
    pos = np.searchsorted(known, keys)
    np.minimum(pos, len(known) - 1, out=pos)
    unknown = known[pos] != keys
    return labels[pos], unknown


def colors_to_labels(rgb: np.ndarray, class_map: ClassMap, where: str = "mask") -> np.ndarray:
    """Map a color-coded mask ``[H, W, 3]`` uint8 to int64 labels ``[H, W]``.

    Raises:
        DataError: naming ``where``, each unknown color as ``#RRGGBB`` and its pixel count.
    """
    keys = pack_rgb(rgb)
    labels, unknown = _lookup_keys(keys, class_map)
    if unknown.any():
        found, counts = np.unique(keys[unknown], return_counts=True)
        raise DataError(f"{where}: {_unknown_colors_message(found, counts, class_map)}")
    return labels


def _hex(key: int) -> str:
    return "#%06X" % key


def _unknown_colors_message(found: np.ndarray, counts: np.ndarray, class_map: ClassMap) -> str:
    order = np.argsort(-counts, kind="stable")[:MAX_REPORTED]
    listed = ", ".join(f"{_hex(int(found[i]))} ({int(counts[i])} px)" for i in order)
    more = f" and {len(found) - len(order)} more color(s)" if len(found) > len(order) else ""
    known = ", ".join(f"{name} {_hex(int(pack_rgb(np.asarray(c, np.uint8))))}" for name, c in zip(class_map.names, class_map.colors))
    message = (
        f"unknown color(s) {listed}{more}: {int(counts.sum())} pixel(s) match no class color "
        f"({known}) and no ignore color"
    )
    greys = [(k >> 16) == ((k >> 8) & 255) == (k & 255) for k in found.tolist()]
    if all(greys):
        message += "; if this mask stores class ids, save it as a single-channel (mode L) PNG"
    return message


# ----------------------------------------------------------------------------- palette PNGs


def palette_is_color_coded(indices: np.ndarray, palette: np.ndarray, class_map: ClassMap) -> bool:
    """Decide how to read a palette mask (``indices`` ``[H, W]`` uint8, ``palette`` ``[N, 3]``).

    Color-coded when every used palette entry is a class or ignore color; else class ids when
    every used index is a valid id or ignore value; else whichever reading has more valid pixels.
    """
    used, counts = np.unique(indices, return_counts=True)
    safe = np.minimum(used, len(palette) - 1)
    _, unknown_color = _lookup_keys(pack_rgb(palette[safe]), class_map)
    unknown_color |= used >= len(palette)
    if not unknown_color.any():
        return True
    table = _id_table(class_map, 256)
    bad_id = table[used] < 0
    if not bad_id.any():
        return False
    return int(counts[~unknown_color].sum()) > int(counts[~bad_id].sum())


def _read_palette_label(path: Path, img: Image.Image, class_map: ClassMap) -> np.ndarray:
    indices = np.asarray(img, dtype=np.uint8)
    raw = img.getpalette() or []
    palette = np.asarray(raw, dtype=np.uint8).reshape(-1, 3) if raw else np.zeros((1, 3), np.uint8)
    if palette_is_color_coded(indices, palette, class_map):
        if len(palette) < 256:
            palette = np.concatenate([palette, np.zeros((256 - len(palette), 3), np.uint8)])
        return colors_to_labels(palette[indices], class_map, where=str(path))
    return ids_to_labels(indices, class_map, where=str(path))
