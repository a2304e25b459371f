"""Predictions to PNG files: class ids, display colours, and an overlay on the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from labelwise.data.classmap import ClassMap
from labelwise.engine.atomic import atomic_path


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


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
    ``color/<stem>.png`` (class colours) and ``overlay/<stem>.png`` (colours blended over the image).

    Args:
        prediction: int ``[H, W]`` class ids.
        image: uint8 ``[H, W, 3]`` RGB image the prediction belongs to.
    """
    out_dir = Path(out_dir)
    paths = {kind: out_dir / kind / f"{stem}.png" for kind in ("ids", "color", "overlay")}
    if class_map.num_classes <= 255:
        _save(prediction.astype(np.uint8), paths["ids"])
    else:
        _save(prediction.astype(np.uint16), paths["ids"])
    colors = class_map.colorize(prediction)
    write_rgb_png(colors, paths["color"])
    write_rgb_png(overlay(image, colors, alpha), paths["overlay"])
    return paths
