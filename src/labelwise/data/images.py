"""Unlabeled images: every image file under one or more folders, for self-supervised pretraining.

Folders are searched recursively for ``.jpg/.jpeg/.png/.bmp/.tif/.tiff`` files; sub-folders
named ``labels`` or ``masks`` (the label folders of the labeled layouts) and hidden files are
skipped, so ``camvid/train`` can be given as it is. The order is deterministic: the folders in
the order given, the files of each sorted by their path relative to it.

Images of any size are accepted. ``max_side`` shrinks an image on load so that its longer side
is at most that many pixels (aspect kept; JPEGs are decoded directly at a reduced scale through
PIL's ``draft`` mode, which is several times faster for large aerial tiles).
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Literal, Sequence, TypedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from labelwise.data.folder import IMAGE_EXTENSIONS, LABEL_DIR_NAMES, Problem
from labelwise.data.io import image_size, read_image
from labelwise.data.preflight import check_image_file, exif_orientation, open_header, upright
from labelwise.errors import DataError

OnError = Literal["raise", "skip"]


class ImageSample(TypedDict):
    """One unlabeled image: ``image`` float32 ``[3, H, W]`` in [0, 1] (RGB) and its ``name``
    (the path relative to its folder, without suffix)."""

    image: torch.Tensor
    name: str


def find_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted by relative path), skipping hidden files
    and folders and ``labels``/``masks`` sub-folders.

    Raises:
        DataError: ``folder`` does not exist, is not a folder, or holds no image file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: image folder not found")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    found = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if any(part.startswith(".") for part in parts) or any(part in LABEL_DIR_NAMES for part in parts[:-1]):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            found.append(path)
    if not found:
        raise DataError(
            f"{folder}: folder holds no images (searched recursively for {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}; "
            f"{'/'.join(LABEL_DIR_NAMES)} sub-folders are skipped)"
        )
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named in ``inputs``: files as given, folders by their image files (not
    recursive, sorted by name).

    Raises:
        DataError: an entry does not exist, or a folder holds no image file.
    """
    files: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found = sorted(p for p in entry.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"{entry}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif entry.is_file():
            files.append(entry)
        else:
            raise DataError(f"{entry}: no such file or folder")
    return files


def read_image_max_side(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """Read ``path`` as uint8 RGB ``[H, W, 3]``, shrunk (antialiased bilinear) so that
    ``max(H, W) <= max_side`` when ``max_side`` is set; smaller images are returned as they are.

    Raises:
        DataError: missing, unreadable, truncated or corrupt file (the message names it).
    """
    if max_side is None:
        return read_image(path)
    path = Path(path)
    height, width = image_size(path)
    if max(height, width) <= max_side:
        return read_image(path)
    scale = max_side / max(height, width)
    try:
        with open_header(path) as img:
            orientation = exif_orientation(img)
            stored_w, stored_h = img.size
            size = (max(1, round(stored_w * scale)), max(1, round(stored_h * scale)))
            if img.format == "JPEG":
                img.draft("RGB", size)  # DCT-domain downscale by 1/2, 1/4 or 1/8, never below size
            img.load()
            rgb = img.convert("RGB") if img.mode != "RGB" else img
            out = np.array(upright(rgb.resize(size, Image.BILINEAR), orientation), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL's decoders raise many types on corrupt data
        raise DataError(f"{path}: cannot decode image ({exc}); the file is truncated or corrupt") from exc
    return np.ascontiguousarray(out)


def to_image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]`` in [0, 1]."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    chw /= np.float32(255.0)
    return torch.from_numpy(chw)


class ImageFolderDataset(Dataset):
    """Every image under ``folders``; yields :class:`ImageSample` dicts.

    Args:
        folders: one folder or a list of folders, searched recursively (see :func:`find_images`).
        max_side: shrink images on load so the longer side is at most this (``None``: as stored).
        on_error: ``"raise"`` (default) checks every file at construction (header and end
            marker, :func:`~labelwise.data.preflight.check_image_file`) and raises
            :class:`DataError` naming the first bad file and the count; ``"skip"`` decodes every image at construction,
            drops the bad ones and warns once with their count.

    ``load(i)`` gives the uint8 ``[H, W, 3]`` array (what multi-crop augmentation crops from);
    ``dataset[i]`` gives ``{"image": float32 [3, H, W] in [0, 1], "name": str}``.
    """

    def __init__(self, folders: str | Path | Sequence[str | Path], max_side: int | None = None,
                 on_error: OnError = "raise") -> None:
        if isinstance(folders, (str, Path)):
            folders = [folders]
        self.folders = [Path(f) for f in folders]
        if not self.folders:
            raise DataError("image dataset: no folder given")
        if on_error not in ("raise", "skip"):
            raise DataError(f"image dataset: on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side <= 0):
            raise DataError(f"image dataset: max_side must be a positive integer or None, got {max_side!r}")
        self.max_side = max_side
        self.on_error = on_error
        self.paths: list[Path] = []
        self.names: list[str] = []
        for folder in self.folders:
            for path in find_images(folder):
                self.paths.append(path)
                self.names.append(path.relative_to(folder).with_suffix("").as_posix())
        if on_error == "raise":
            problems = []
            for path in self.paths:
                try:
                    check_image_file(path)  # header + end marker: cheap, catches truncated files too
                except DataError as exc:
                    problems.append(str(exc))
            if problems:
                more = f" (and {len(problems) - 1} more bad file(s))" if len(problems) > 1 else ""
                raise DataError(f"{problems[0]}{more}; fix or remove the file(s), or set on_error=skip to leave "
                                "them out")
        else:
            self._drop_bad()

    def _drop_bad(self) -> None:
        problems: list[Problem] = []
        keep = []
        for index, path in enumerate(self.paths):
            try:
                read_image(path)
            except DataError as exc:
                problems.append(Problem(path, "unreadable image", str(exc)))
            else:
                keep.append(index)
        if not problems:
            return
        self.paths = [self.paths[i] for i in keep]
        self.names = [self.names[i] for i in keep]
        counts = Counter(p.kind for p in problems)
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        details = "; ".join(p.message for p in problems[:5]) + ("; ..." if len(problems) > 5 else "")
        where = ", ".join(str(f) for f in self.folders)
        if not self.paths:
            raise DataError(f"{where}: no readable images ({summary}). {details}")
        warnings.warn(f"{where}: skipped {len(problems)} bad file(s) ({summary}); {len(self.paths)} image(s) kept. "
                      f"{details}", stacklevel=3)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 ``[H, W, 3]`` (shrunk to ``max_side``).

        Raises:
            DataError: the file cannot be decoded (message names it).
        """
        if not 0 <= index < len(self.paths):
            raise IndexError(f"image dataset: index {index} out of range for {len(self.paths)} images")
        return read_image_max_side(self.paths[index], self.max_side)

    def __getitem__(self, index: int) -> ImageSample:
        return ImageSample(image=to_image_tensor(self.load(index)), name=self.names[index])

    def __repr__(self) -> str:
        folders = ", ".join(str(f) for f in self.folders)
        return f"{type(self).__name__}([{folders}], {len(self)} images, max_side={self.max_side})"
