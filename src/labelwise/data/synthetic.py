"""A deterministic synthetic segmentation dataset: textured shapes on a textured background.

Every class has its own shape family, base color and texture (noise, checker, stripes of a
class-specific orientation and period, dots), so a small CNN can learn it; per-image color
casts, per-shape brightness, occlusions and pixel noise keep it from being trivial. Masks are
exact. Sample ``i`` is generated on demand from ``np.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from labelwise.data.base import Sample, SegmentationDataset
from labelwise.data.classmap import ClassMap
from labelwise.errors import ConfigError


@dataclass(frozen=True)
class ClassStyle:
    """How one foreground class is drawn: shape family, base RGB in [0, 1], texture."""

    name: str
    shape: str
    color: tuple[float, float, float]
    texture: str  # "noise" | "checker" | "stripes" | "dots"
    period: float  # texture period in pixels
    angle: float  # stripe orientation in degrees


_STYLES = (
    ClassStyle("disc", "ellipse", (0.80, 0.30, 0.25), "noise", 1.0, 0.0),
    ClassStyle("box", "rectangle", (0.25, 0.40, 0.80), "checker", 6.0, 0.0),
    ClassStyle("stripes", "polygon", (0.30, 0.70, 0.30), "stripes", 6.0, 45.0),
    ClassStyle("blob", "blob", (0.80, 0.75, 0.30), "stripes", 4.0, 0.0),
    ClassStyle("triangle", "triangle", (0.65, 0.35, 0.75), "dots", 8.0, 0.0),
    ClassStyle("ring", "ring", (0.30, 0.75, 0.75), "stripes", 8.0, 135.0),
    ClassStyle("bar", "bar", (0.85, 0.55, 0.20), "checker", 3.0, 0.0),
)
_SHAPES = ("ellipse", "rectangle", "polygon", "blob", "triangle", "ring", "bar")
_TEXTURES = ("stripes", "checker", "dots", "noise")


def class_style(class_id: int) -> ClassStyle:
    """The style of foreground class ``class_id`` (>= 1); classes beyond the named seven get
    generated shapes, hues, textures and stripe angles."""
    if class_id <= len(_STYLES):
        return _STYLES[class_id - 1]
    k = class_id - 1
    hue = (k * 0.618034) % 1.0
    color = colorsys.hsv_to_rgb(hue, 0.6, 0.8)
    return ClassStyle(
        f"shape{class_id}",
        _SHAPES[k % len(_SHAPES)],
        (float(color[0]), float(color[1]), float(color[2])),
        _TEXTURES[k % len(_TEXTURES)],
        3.0 + (k % 6),
        (k * 37.0) % 180.0,
    )


# ----------------------------------------------------------------------------- geometry


def _rotated(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    return dx * c + dy * s, -dx * s + dy * c


def _polygon(yy: np.ndarray, xx: np.ndarray, vy: np.ndarray, vx: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every pixel centre (vectorised over pixels)."""
    inside = np.zeros(yy.shape, dtype=bool)
    n = len(vy)
    for i in range(n):
        y1, x1, y2, x2 = vy[i], vx[i], vy[(i + 1) % n], vx[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > yy) != (y2 > yy)
        x_at = (x2 - x1) * (yy - y1) / (y2 - y1) + x1
        inside ^= crosses & (xx < x_at)
    return inside


def _star_polygon(rng: np.random.Generator, cy: float, cx: float, radius: float, count: int) -> tuple[np.ndarray, np.ndarray]:
    angles = rng.uniform(0, 2 * np.pi) + (np.arange(count) + rng.uniform(-0.3, 0.3, count)) * (2 * np.pi / count)
    radii = radius * rng.uniform(0.6, 1.0, count)
    return cy + radii * np.sin(angles), cx + radii * np.cos(angles)


def draw_shape(shape: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean ``[H, W]`` region of one random shape of family ``shape``."""
    height, width = yy.shape
    side = min(height, width)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    radius = rng.uniform(0.15, 0.35) * side
    theta = rng.uniform(0, np.pi)
    if shape in ("ellipse", "ring"):
        u, v = _rotated(yy, xx, cy, cx, theta)
        a, b = radius, radius * rng.uniform(0.6, 1.0)
        r2 = (u / a) ** 2 + (v / b) ** 2
        return (r2 <= 1.0) & (r2 >= 0.3) if shape == "ring" else r2 <= 1.0
    if shape in ("rectangle", "bar"):
        u, v = _rotated(yy, xx, cy, cx, theta)
        a = radius * (1.3 if shape == "bar" else 1.0)
        b = radius * (rng.uniform(0.15, 0.25) if shape == "bar" else rng.uniform(0.5, 1.0))
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if shape == "polygon":
        return _polygon(yy, xx, *_star_polygon(rng, cy, cx, radius * 1.2, int(rng.integers(5, 8))))
    if shape == "triangle":
        return _polygon(yy, xx, *_star_polygon(rng, cy, cx, radius * 1.3, 3))
    if shape == "blob":
        dy, dx = yy - cy, xx - cx
        angle = np.arctan2(dy, dx)
        phases = rng.uniform(0, 2 * np.pi, 2)
        edge = radius * (1.0 + 0.25 * np.sin(2 * angle + phases[0]) + 0.15 * np.sin(3 * angle + phases[1]))
        return dy * dy + dx * dx <= edge * edge
    raise ValueError(f"unknown shape family {shape!r}")


def draw_texture(style: ClassStyle, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Texture pattern ``[H, W]`` with values in about [-1, 1]."""
    phase = rng.uniform(0, 2 * np.pi)
    if style.texture == "noise":
        return np.clip(rng.standard_normal(yy.shape).astype(np.float32) * 0.6, -1, 1)
    if style.texture == "checker":
        return np.sign(np.sin(np.pi * xx / style.period + phase) * np.sin(np.pi * yy / style.period + phase))
    if style.texture == "dots":
        return np.sin(2 * np.pi * xx / style.period + phase) * np.sin(2 * np.pi * yy / style.period + phase)
    angle = np.deg2rad(style.angle)
    return np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / style.period + phase)


# ----------------------------------------------------------------------------- dataset


class SyntheticShapes(SegmentationDataset):
    """Textured shapes with exact masks, generated deterministically from ``seed``.

    Args:
        num_images: dataset length.
        size: ``(H, W)`` in pixels.
        num_classes: classes including class 0 "background" (at least 2).
        seed: same seed → identical samples; different seeds → different samples.
        min_shapes, max_shapes: shapes per image (inclusive range).
        noise: standard deviation of the additive pixel noise (image values in [0, 1]).
        color_mix: each shape's and the background's color is blended with a random color by
            a fraction drawn in ``[0, color_mix]``, so color alone does not give the class
            away and textures matter (0: class colors only; easier).

    Items: image float32 ``[3, H, W]`` in [0, 1], mask int64 ``[H, W]`` in ``[0, num_classes)``
    (no ignore pixels), name ``"synthetic_<index>"``.
    """

    def __init__(
        self,
        num_images: int = 64,
        size: tuple[int, int] = (96, 128),
        num_classes: int = 5,
        seed: int = 0,
        min_shapes: int = 3,
        max_shapes: int = 6,
        noise: float = 0.05,
        color_mix: float = 0.4,
    ) -> None:
        if num_classes < 2:
            raise ConfigError(f"SyntheticShapes: num_classes must be at least 2, got {num_classes}")
        if num_classes > 255:
            raise ConfigError(f"SyntheticShapes: num_classes must be at most 255, got {num_classes}")
        if num_images <= 0:
            raise ConfigError(f"SyntheticShapes: num_images must be positive, got {num_images}")
        if len(size) != 2 or min(size) < 8:
            raise ConfigError(f"SyntheticShapes: size must be (H, W) with both >= 8, got {size}")
        if not 1 <= min_shapes <= max_shapes:
            raise ConfigError(f"SyntheticShapes: need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
        self.num_images = int(num_images)
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.min_shapes, self.max_shapes = int(min_shapes), int(max_shapes)
        self.noise = float(noise)
        self.color_mix = float(color_mix)
        self.styles = [class_style(c) for c in range(1, num_classes)]
        names = ("background", *(s.name for s in self.styles))
        colors = tuple(_to_rgb8(c) for c in [(0.5, 0.5, 0.5), *(s.color for s in self.styles)])
        if len(set(colors)) == len(colors):
            self.class_map = ClassMap(names, colors)
        else:
            self.class_map = ClassMap.from_names(names)

    @cached_property
    def _grid(self) -> tuple[np.ndarray, np.ndarray]:
        height, width = self.size
        yy, xx = np.meshgrid(np.arange(height, dtype=np.float32) + 0.5, np.arange(width, dtype=np.float32) + 0.5, indexing="ij")
        return yy, xx

    def __len__(self) -> int:
        return self.num_images

    def generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``index`` as (image float32 ``[H, W, 3]`` in [0, 1], mask int64 ``[H, W]``)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"SyntheticShapes: index {index} out of range for {self.num_images} images")
        rng = np.random.default_rng([self.seed, index])
        yy, xx = self._grid
        image = self._background(rng, yy, xx)
        mask = np.zeros(self.size, dtype=np.int64)
        cast = rng.uniform(0.85, 1.15, 3).astype(np.float32)
        for _ in range(int(rng.integers(self.min_shapes, self.max_shapes + 1))):
            class_id = int(rng.integers(1, self.num_classes))
            style = self.styles[class_id - 1]
            region = draw_shape(style.shape, rng, yy, xx)
            color = self._mix(rng, np.asarray(style.color, dtype=np.float32)) * cast * rng.uniform(0.8, 1.2)
            amplitude = rng.uniform(0.2, 0.4)
            pattern = draw_texture(style, rng, yy, xx)[region]
            image[region] = color[None, :] * (1.0 + amplitude * pattern[:, None])
            mask[region] = class_id
        image += rng.standard_normal(image.shape).astype(np.float32) * self.noise
        return np.clip(image, 0.0, 1.0), mask

    def _background(self, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        """A smooth tinted grey gradient with a faint low-frequency wave, ``[H, W, 3]``."""
        height, width = self.size
        level = rng.uniform(0.35, 0.65)
        color = self._mix(rng, level + rng.uniform(-0.08, 0.08, 3))
        fy, fx = rng.uniform(0.3, 1.5, 2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.15 * np.sin(2 * np.pi * (fy * yy / height + fx * xx / width) + phase)
        return (color[None, None, :] * (1.0 + wave[..., None])).astype(np.float32)

    def _mix(self, rng: np.random.Generator, color: np.ndarray) -> np.ndarray:
        """Blend ``color`` with a random color by a random fraction in [0, color_mix]."""
        alpha = rng.uniform(0.0, self.color_mix)
        return ((1.0 - alpha) * color + alpha * rng.uniform(0.1, 0.9, 3)).astype(np.float32)

    def __getitem__(self, index: int) -> Sample:
        image, mask = self.generate(index)
        return Sample(
            image=torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            mask=torch.from_numpy(mask),
            name=f"synthetic_{index:05d}",
        )

    def image_labels(self, index: int) -> torch.Tensor:
        """Float ``[num_classes]`` multi-hot of the classes visible in mask ``index``."""
        _, mask = self.generate(index)
        labels = torch.zeros(self.num_classes)
        labels[torch.from_numpy(np.unique(mask))] = 1.0
        return labels


def _to_rgb8(color: tuple[float, float, float]) -> tuple[int, int, int]:
    return (int(round(color[0] * 255)), int(round(color[1] * 255)), int(round(color[2] * 255)))
