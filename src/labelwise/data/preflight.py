"""Fast pre-flight checks of image files, run on every file before training starts.

A corrupt file found hours into a run costs the run; these checks find it at start-up without
decoding every image: the header is parsed (format, size, mode; PIL's decompression-bomb limit
applies: above twice ``PIL.Image.MAX_IMAGE_PIXELS`` a file is refused), 0-byte files are
refused, and a JPEG / PNG must end with its end marker (JPEG ``EOI`` ``FF D9``, PNG ``IEND``
chunk), which a truncated file lacks. Only a file whose marker is not where
it is expected (camera trailers after ``EOI``, other formats) is decoded in full to decide.

Orientation: images are used as they are displayed, with their EXIF orientation applied (as
PIL's ``ImageOps.exif_transpose``, OpenCV's ``imread`` and every labelling tool do), so sizes
reported here are the displayed ``(H, W)``.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from labelwise.errors import DataError

#: Bytes read from the end of a file to look for its end marker.
TAIL_BYTES = 64

#: EXIF orientations that swap width and height (transposed / rotated by 90 degrees).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an open image (1, the identity, when absent or unreadable)."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not worth refusing the image for
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


#: EXIF orientation -> the transpose that shows the image upright (as ``ImageOps.exif_transpose``).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """``img`` (pixels as stored) turned to its displayed orientation (EXIF code ``orientation``)."""
    method = _UPRIGHT.get(orientation)
    return img if method is None else img.transpose(method)


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """Displayed ``(H, W)`` of an open image (EXIF orientation applied)."""
    width, height = img.size
    if exif_orientation(img) in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return height, width


def open_header(path: Path) -> Image.Image:
    """Open ``path`` (header only); every failure becomes a :class:`DataError` naming the file."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror})") from exc
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused: {decompression_bomb_message(exc)}") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from exc
    except Exception as exc:  # noqa: BLE001 - PIL's parsers raise many types on corrupt data
        raise DataError(f"{path}: cannot read image header ({type(exc).__name__}: {exc}); the file is "
                        "truncated or corrupt") from exc


def decompression_bomb_message(exc: Exception) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    return (f"{exc} (PIL.Image.MAX_IMAGE_PIXELS = {limit}); cut the image into tiles, or raise the limit "
            "in Python if you trust the file")


def _ends_with_marker(path: Path, image_format: str | None) -> bool | None:
    """True / False when ``path`` ends (within :data:`TAIL_BYTES`) with its format's end marker;
    None for formats without one checked here."""
    marker = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}.get(image_format or "")
    if marker is None:
        return None
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        handle.seek(max(0, end - TAIL_BYTES))
        tail = handle.read()
    return marker in tail


def check_image_file(path: str | Path) -> tuple[int, int]:
    """Check that ``path`` is a complete, readable image without decoding it where possible.

    Returns:
        The displayed ``(H, W)`` (EXIF orientation applied).

    Raises:
        DataError: missing, empty, not an image, above the decompression-bomb limit, truncated
            or corrupt (the message names the file and the problem).
    """
    path = Path(path)
    img = open_header(path)
    try:
        hw = oriented_size(img)
        if min(hw) <= 0:
            raise DataError(f"{path}: image has no pixels ({hw[1]}x{hw[0]})")
        try:
            complete = _ends_with_marker(path, img.format)
        except OSError as exc:
            raise DataError(f"{path}: cannot read file ({exc.strerror})") from exc
        if not complete:  # no marker at the end (or a format without one): decode to decide
            try:
                img.load()
            except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types on corrupt data
                raise DataError(f"{path}: cannot decode image ({exc}); the file is truncated or corrupt") from exc
    finally:
        img.close()
    return hw
