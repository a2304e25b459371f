"""Datasets of image/mask file pairs: the folder layout ``root/images/*`` + ``root/labels/*``.

:class:`PairedFilesDataset` holds the shared machinery (pairs, loading, resizing, validation,
``on_error="skip"``); :class:`FolderDataset` discovers the pairs of one folder. Anything with a
``pairs`` list, a ``class_map`` and ``load_pair(i)`` is a :class:`PairSource`, which is what
:class:`labelwise.data.aerial.RandomCropDataset` samples crops from.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from labelwise.data.base import Sample, SegmentationDataset
from labelwise.data.classmap import ClassMap
from labelwise.data.io import image_size, read_image, read_label
from labelwise.data.preflight import check_image_file
from labelwise.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif")
LABEL_DIR_NAMES = ("labels", "masks")

OnError = Literal["raise", "skip"]
Pair = tuple[Path, Path]


@runtime_checkable
class PairSource(Protocol):
    """Anything that yields whole image/mask pairs (a folder, a set of aerial tiles)."""

    pairs: list[Pair]
    class_map: ClassMap

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair ``index`` as (image uint8 ``[H, W, 3]``, mask int64 ``[H, W]``)."""
        ...


@dataclass(frozen=True)
class Problem:
    """One defect found in a dataset: the file at fault, a short kind, the full message."""

    path: Path
    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------- discovery


def coerce_class_map(class_map: ClassMap | str | Path | Sequence[str] | None, root: Path) -> ClassMap:
    """A ClassMap from a ClassMap, a ``classes.json`` path, a list of names, or ``None``
    (then ``root/classes.json``)."""
    if isinstance(class_map, ClassMap):
        return class_map
    if class_map is None:
        path = root / "classes.json"
        if not path.exists():
            raise DataError(f"{root}: no class_map given and no classes.json in the dataset folder")
        return ClassMap.from_json(path)
    if isinstance(class_map, (str, Path)):
        return ClassMap.from_json(class_map)
    return ClassMap.from_names(list(class_map))


def find_label_dir(root: Path) -> Path:
    """``root/labels`` or ``root/masks`` (exactly one of them must exist)."""
    found = [root / name for name in LABEL_DIR_NAMES if (root / name).is_dir()]
    if not found:
        raise DataError(f"{root}: no label folder; expected {root / 'labels'} or {root / 'masks'}")
    if len(found) > 1:
        raise DataError(f"{root}: both labels/ and masks/ exist; keep only one label folder")
    return found[0]


def _files_by_stem(folder: Path, extensions: Sequence[str], what: str) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in extensions or path.name.startswith("."):
            continue
        if path.stem in by_stem:
            raise DataError(f"{path}: two {what} files share the stem {path.stem!r} ({by_stem[path.stem].name})")
        by_stem[path.stem] = path
    return by_stem


def discover_pairs(root: str | Path) -> tuple[list[Pair], list[Problem]]:
    """Match ``root/images/*`` with ``root/labels/*`` (or ``masks/``) by file stem.

    Returns:
        The sorted pairs, and the unmatched files as problems (image without mask, mask
        without image).

    Raises:
        DataError: missing root, missing or empty images folder, missing label folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DataError(f"{root}: no images folder; expected {image_dir}")
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS, "image")
    if not images:
        raise DataError(f"{image_dir}: images folder is empty (no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files)")
    label_dir = find_label_dir(root)
    labels = _files_by_stem(label_dir, LABEL_EXTENSIONS, "label")
    pairs = [(images[s], labels[s]) for s in sorted(images) if s in labels]
    problems = [
        Problem(images[s], "image without mask", f"{images[s]}: image has no mask (expected {label_dir / s}.png)")
        for s in sorted(images)
        if s not in labels
    ]
    problems += [
        Problem(labels[s], "mask without image", f"{labels[s]}: mask has no image (expected {image_dir / s}.jpg/.png)")
        for s in sorted(labels)
        if s not in images
    ]
    return pairs, problems


# ----------------------------------------------------------------------------- resizing


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 ``[H, W, 3]`` to ``size`` = (H, W) with PIL bilinear (antialiased when shrinking)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.array(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``[H, W]`` labels to ``size`` = (H, W) by nearest neighbour (pixel-centre sampling)."""
    height, width = size
    in_h, in_w = mask.shape
    if (in_h, in_w) == (height, width):
        return mask
    rows = np.minimum(((np.arange(height) + 0.5) * (in_h / height)).astype(np.int64), in_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (in_w / width)).astype(np.int64), in_w - 1)
    return mask[rows[:, None], cols[None, :]]


def to_sample(image: np.ndarray, mask: np.ndarray, name: str) -> Sample:
    """uint8 ``[H, W, 3]`` + int ``[H, W]`` → Sample (image float32 ``[3, H, W]`` in [0, 1])."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)  # a new, writable array
    chw /= np.float32(255.0)
    labels = np.ascontiguousarray(mask, dtype=np.int64)
    if not labels.flags.writeable:
        labels = labels.copy()
    return Sample(image=torch.from_numpy(chw), mask=torch.from_numpy(labels), name=name)


# ----------------------------------------------------------------------------- datasets


def size_mismatch(image_path: Path, mask_path: Path, image_hw: Sequence[int], mask_hw: Sequence[int]) -> str:
    """The message of an image and its mask that differ in size."""
    return (f"{image_path} and {mask_path}: size mismatch, image is {image_hw[1]}x{image_hw[0]} (WxH) but mask is "
            f"{mask_hw[1]}x{mask_hw[0]}")


def _mask_problem_kind(exc: DataError) -> str:
    return "invalid label" if ("invalid class id" in str(exc) or "unknown color" in str(exc)) else "unreadable mask"


class PairedFilesDataset(SegmentationDataset):
    """A dataset of (image file, mask file) pairs; yields :class:`Sample` items.

    Subclasses call :meth:`_setup` with the discovered pairs. With ``on_error="raise"`` every
    pair gets the fast pre-flight check (:meth:`preflight_pair`: image header and end marker,
    mask labels, sizes) and any problem is an error naming the first bad file and the count;
    with ``on_error="skip"`` every pair is fully decoded, bad ones are dropped and one warning
    names them.
    """

    pairs: list[Pair]
    names: list[str]

    def _setup(
        self,
        pairs: list[Pair],
        problems: list[Problem],
        class_map: ClassMap,
        resize: tuple[int, int] | None,
        on_error: OnError,
        where: str,
        names: list[str] | None = None,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise DataError(f"{where}: on_error must be 'raise' or 'skip', got {on_error!r}")
        if resize is not None:
            resize = (int(resize[0]), int(resize[1]))
            if min(resize) <= 0:
                raise DataError(f"{where}: resize must be two positive ints (H, W), got {resize}")
        self.class_map = class_map
        self.resize = resize
        self.on_error = on_error
        self.where = where
        self.pairs = list(pairs)
        self.names = list(names) if names is not None else [p[0].stem for p in pairs]
        self._sizes: dict[int, tuple[int, int]] = {}
        self._label_cache: dict[int, torch.Tensor] = {}
        if on_error == "raise":
            problems = problems + [p for i in range(len(self.pairs)) if (p := self.preflight_pair(i)) is not None]
            if problems:
                more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
                raise DataError(f"{problems[0].message}{more}; fix the file(s), or set data.on_error=skip to leave "
                                "the bad pairs out")
        else:
            self._drop_bad(problems)
        if not self.pairs:
            raise DataError(f"{where}: no usable image/mask pairs")

    # -- validation -----------------------------------------------------------------

    def _check_sizes(self, index: int) -> tuple[int, int]:
        """Header-only size check of pair ``index``; returns the image size (H, W)."""
        image_path, mask_path = self.pairs[index]
        image_hw = image_size(image_path)
        mask_hw = image_size(mask_path)
        if image_hw != mask_hw:
            raise DataError(size_mismatch(image_path, mask_path, image_hw, mask_hw))
        self._sizes[index] = image_hw
        return image_hw

    def preflight_pair(self, index: int) -> Problem | None:
        """The fast check of pair ``index`` run before training: the image's header and end
        marker (:func:`~labelwise.data.preflight.check_image_file`, no pixel decoding), the
        mask decoded with its label values checked, and equal sizes."""
        return self.check_pair(index, decode_image=False)

    def check_pair(self, index: int, decode_image: bool = True) -> Problem | None:
        """Validate pair ``index``: the image (decoded, or with ``decode_image=False`` its header
        and end marker only), the mask decoded with its labels checked, equal sizes."""
        image_path, mask_path = self.pairs[index]
        try:
            image_hw = read_image(image_path).shape[:2] if decode_image else check_image_file(image_path)
        except DataError as exc:
            return Problem(image_path, "unreadable image", str(exc))
        try:
            mask_hw = read_label(mask_path, self.class_map).shape
        except DataError as exc:
            return Problem(mask_path, _mask_problem_kind(exc), str(exc))
        if image_hw != mask_hw:
            return Problem(image_path, "size mismatch", size_mismatch(image_path, mask_path, image_hw, mask_hw))
        self._sizes[index] = image_hw
        return None

    def validate(self) -> list[str]:
        """Check every pair (decoding all pixels); return one message per problem (empty: all good)."""
        return [str(p) for i in range(len(self.pairs)) if (p := self.check_pair(i)) is not None]

    def _drop_bad(self, problems: list[Problem]) -> None:
        checked = [(i, self.check_pair(i)) for i in range(len(self.pairs))]
        bad = {i for i, p in checked if p is not None}
        problems = problems + [p for _, p in checked if p is not None]
        if not problems:
            return
        sizes = [self._sizes[i] for i in range(len(self.pairs)) if i not in bad]
        self.pairs = [p for i, p in enumerate(self.pairs) if i not in bad]
        self.names = [n for i, n in enumerate(self.names) if i not in bad]
        self._sizes = dict(enumerate(sizes))
        counts = Counter(p.kind for p in problems)
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        details = "; ".join(p.message for p in problems[:5]) + ("; ..." if len(problems) > 5 else "")
        warnings.warn(
            f"{self.where}: skipped {len(problems)} bad file(s) or pair(s) ({summary}); "
            f"{len(self.pairs)} pair(s) kept. {details}",
            stacklevel=4,
        )

    # -- access -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.pairs)

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of sample ``index`` as this dataset yields it (after ``resize``)."""
        if self.resize is not None:
            return self.resize
        if index not in self._sizes:
            self._check_sizes(index)
        return self._sizes[index]

    def load_mask(self, index: int) -> np.ndarray:
        """Mask of pair ``index``: int64 ``[H, W]`` (resized by nearest neighbour if ``resize``)."""
        mask = read_label(self.pairs[index][1], self.class_map)
        return resize_mask(mask, self.resize) if self.resize is not None else mask

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair ``index`` as (image uint8 ``[H, W, 3]``, mask int64 ``[H, W]``), resized if set.

        Raises:
            DataError: unreadable file, invalid labels, or image/mask size mismatch.
        """
        if not 0 <= index < len(self.pairs):
            raise IndexError(f"{self.where}: index {index} out of range for {len(self.pairs)} pairs")
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        mask = read_label(mask_path, self.class_map)
        if image.shape[:2] != mask.shape:
            raise DataError(size_mismatch(image_path, mask_path, image.shape[:2], mask.shape))
        if self.resize is not None:
            image, mask = resize_image(image, self.resize), resize_mask(mask, self.resize)
        return image, mask

    def __getitem__(self, index: int) -> Sample:
        image, mask = self.load_pair(index)
        return to_sample(image, mask, self.names[index])

    def image_labels(self, index: int) -> torch.Tensor:
        """Float ``[num_classes]`` multi-hot of the classes in mask ``index`` (reads only the
        mask; cached)."""
        if index not in self._label_cache:
            mask = self.load_mask(index)
            present = np.unique(mask[mask != self.class_map.ignore_index])
            labels = torch.zeros(self.num_classes)
            labels[torch.from_numpy(present)] = 1.0
            self._label_cache[index] = labels
        return self._label_cache[index].clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where!s}, {len(self)} pairs, {self.num_classes} classes)"


class FolderDataset(PairedFilesDataset):
    """Image/mask pairs of ``root/images/*`` and ``root/labels/*`` (or ``root/masks/*``),
    matched by file stem.

    Args:
        root: the dataset folder.
        class_map: a ClassMap, a path to a ``classes.json``, a list of class names, or ``None``
            for ``root/classes.json``.
        resize: ``(H, W)`` to resize every sample to (image bilinear, mask nearest), or ``None``.
        on_error: ``"raise"`` (default) stops at the first problem; ``"skip"`` validates every
            pair at construction, drops bad ones and warns once with the counts.

    Items are :class:`Sample`: image float32 ``[3, H, W]`` in [0, 1], mask int64 ``[H, W]``.
    """

    def __init__(
        self,
        root: str | Path,
        class_map: ClassMap | str | Path | Sequence[str] | None = None,
        resize: tuple[int, int] | None = None,
        on_error: OnError = "raise",
    ) -> None:
        self.root = Path(root)
        pairs, problems = discover_pairs(self.root)
        self._setup(pairs, problems, coerce_class_map(class_map, self.root), resize, on_error, str(self.root))
