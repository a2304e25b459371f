"""Predictions to PNG files: class ids, display colors, and an overlay on the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from labelwise.data.classmap import ClassMap
from labelwise.io.atomic import atomic_path


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_id_png(ids: np.ndarray, path: Path, max_id: int) -> None:
    """Write integer ids ``[H, W]`` (class / cluster ids, ignore values) as a grey PNG (atomically):
    8-bit when ``max_id`` (the largest id the file set may hold) is at most 255, else 16-bit, so
    every file of one output has the same depth. Ids outside ``[0, max_id]`` are an error rather
    than a silent wrap-around."""
    if max_id > 65535:
        raise ValueError(f"{path}: ids up to {max_id} do not fit a 16-bit PNG")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > max_id):
        raise ValueError(f"{path}: ids span [{int(ids.min())}, {int(ids.max())}], outside [0, {max_id}]")
    _save(ids.astype(np.uint8 if max_id <= 255 else np.uint16), Path(path))


def write_gray_png(image: np.ndarray, path: Path) -> None:
    """Write a uint8 ``[H, W]`` array (e.g. a heat map scaled to 0-255) as a grey PNG (atomically)."""
    _save(np.ascontiguousarray(image, dtype=np.uint8), Path(path))


def write_rgb_png(image: np.ndarray, path: Path) -> None:
    """Write an RGB uint8 ``[H, W, 3]`` array as PNG (atomically)."""
    _save(np.ascontiguousarray(image, dtype=np.uint8), Path(path))


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend ``colors [H, W, 3]`` over ``image [H, W, 3]`` (uint8) with weight ``alpha``."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def write_prediction_pngs(prediction: np.ndarray, image: np.ndarray, class_map: ClassMap, out_dir: Path,
                          stem: str, alpha: float = 0.5) -> dict[str, Path]:
    """Write ``ids/<stem>.png`` (8-bit class ids; 16-bit when there are more than 255 classes),
    ``color/<stem>.png`` (class colors) and ``overlay/<stem>.png`` (colors blended over the image).

    Args:
        prediction: int ``[H, W]`` class ids.
        image: uint8 ``[H, W, 3]`` RGB image the prediction belongs to.
    """
    out_dir = Path(out_dir)
    paths = {kind: out_dir / kind / f"{stem}.png" for kind in ("ids", "color", "overlay")}
    write_id_png(prediction, paths["ids"], max(class_map.num_classes - 1, 0))
    colors = class_map.colorize(prediction)
    write_rgb_png(colors, paths["color"])
    write_rgb_png(overlay(image, colors, alpha), paths["overlay"])
    return paths
