"""ViT class-token attention maps as images (the familiar DINO figure).

``attention_maps(backbone, image)`` runs one forward and returns the attention of the class token
to every patch in the chosen block, one map per head, upsampled to the image by repeating each
patch value over its ``patch x patch`` pixels (nearest, as DINO's figure; the padded border is
cropped). ``save_attention_pngs`` writes, per image::

    <out>/<stem>/head_00.png ... head_{heads-1}.png    each head, min-max normalised, color-mapped
    <out>/<stem>/mean.png                              mean over heads, min-max normalised
    <out>/<stem>/overlay.png                           mean.png blended over the image

Min-max normalisation maps a map's minimum to 0 and maximum to 1 (a constant map becomes 0);
the color map (:func:`colormap`, viridis-like, 256 entries interpolated linearly between five
anchor colors) then takes entry ``round(255 * value)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from labelwise.engine.runtime import autocast, resolve_device
from labelwise.errors import ConfigError
from labelwise.report.png import overlay, write_rgb_png

__all__ = ["attention_maps", "colormap", "minmax_normalise", "save_attention_pngs", "write_attention_figures"]

#: Anchor colors of the viridis-like color map at 0, 0.25, 0.5, 0.75 and 1.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap_table() -> np.ndarray:
    """The 256-entry uint8 ``[256, 3]`` color table."""
    positions = np.linspace(0.0, 1.0, len(_ANCHORS))
    steps = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(steps, positions, _ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.rint(table).astype(np.uint8)


def colormap(values: np.ndarray) -> np.ndarray:
    """Color ``values`` in [0, 1] (any shape ``S``) -> uint8 ``[*S, 3]``; values are clipped."""
    index = np.rint(np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * 255).astype(np.int64)
    return colormap_table()[index]


def minmax_normalise(values: np.ndarray) -> np.ndarray:
    """``(v - min) / (max - min)`` as float64 (zeros for a constant map)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


@torch.no_grad()
def attention_maps(backbone: nn.Module, image: Tensor, block: int = -1, *, device: str | torch.device | None = None,
                   precision: str = "fp32") -> Tensor:
    """Class-token -> patch attention of ``block``, per head, at image resolution.

    Args:
        backbone: a ``VisionTransformer`` (``forward(images, return_attention=...)``).
        image: float ``[3, H, W]`` (or ``[1, 3, H, W]``) in [0, 1].
        block: block index (negative counts from the end).
        device: where to run (default: the backbone's device).
        precision: ``"fp32"`` or ``"bf16"`` autocast.

    Returns:
        float32 ``[heads, H, W]`` on the CPU (each patch's weight repeated over its pixels).
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"attention_maps expects one image [3, H, W]; got shape {tuple(image.shape)}")
    depth = int(getattr(backbone, "depth", len(getattr(backbone, "blocks", ())) or 0))
    if depth and not -depth <= block < depth:
        raise ConfigError(f"block {block} is out of range for a ViT of depth {depth} (use 0..{depth - 1} or -1)")
    torch_device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    try:
        with autocast(torch_device, precision):
            output = backbone(image.to(torch_device).float(), return_attention=(block,))
    finally:
        backbone.train(was_training)
    (weights,) = output.attentions.values()  # [1, heads, N, N]
    patch = int(backbone.patch_size)
    height, width = image.shape[-2:]
    h, w = math.ceil(height / patch), math.ceil(width / patch)
    prefix = int(backbone.num_prefix_tokens)
    cls = weights[0, :, 0, prefix:].float().reshape(-1, h, w)
    maps = F.interpolate(cls[None], scale_factor=patch, mode="nearest")[0]
    return maps[:, :height, :width].cpu()


def _image_uint8(image: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.dim() == 4:
            image = image[0]
        array = image.permute(1, 2, 0).float().numpy() if image.shape[0] == 3 else image.float().numpy()
        return np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8)
    array = np.asarray(image)
    return array if array.dtype == np.uint8 else np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8)


def save_attention_pngs(maps: Tensor | np.ndarray, image: Tensor | np.ndarray, out_dir: str | Path,
                        alpha: float = 0.5) -> list[Path]:
    """Write ``head_XX.png`` per head, ``mean.png`` and ``overlay.png`` into ``out_dir``.

    Args:
        maps: ``[heads, H, W]`` attention (e.g. from :func:`attention_maps`).
        image: the image, uint8 ``[H, W, 3]`` or float ``[3, H, W]`` in [0, 1].
        alpha: weight of the color-mapped mean in the overlay.

    Returns:
        The written paths: the heads in order, then ``mean.png``, then ``overlay.png``.
    """
    values = maps.detach().cpu().double().numpy() if isinstance(maps, Tensor) else np.asarray(maps, np.float64)
    if values.ndim != 3:
        raise ValueError(f"maps must be [heads, H, W]; got shape {values.shape}")
    rgb = _image_uint8(image)
    if rgb.shape[:2] != values.shape[1:]:
        raise ValueError(f"image {rgb.shape[:2]} and attention maps {values.shape[1:]} differ in size")
    out_dir = Path(out_dir)
    written = []
    for head, head_map in enumerate(values):
        path = out_dir / f"head_{head:02d}.png"
        write_rgb_png(colormap(minmax_normalise(head_map)), path)
        written.append(path)
    mean_colors = colormap(minmax_normalise(values.mean(0)))
    write_rgb_png(mean_colors, out_dir / "mean.png")
    write_rgb_png(overlay(rgb, mean_colors, alpha), out_dir / "overlay.png")
    return [*written, out_dir / "mean.png", out_dir / "overlay.png"]


def load_image_tensor(path: str | Path, size: int | None = None) -> Tensor:
    """Read an image as float ``[3, H, W]`` in [0, 1]; with ``size``, resize (bilinear) so that
    the shorter side is ``size`` pixels, keeping the aspect ratio."""
    from labelwise.data.io import read_image

    array = read_image(path)
    if size:
        height, width = array.shape[:2]
        scale = size / min(height, width)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        if new != (width, height):
            array = np.array(Image.fromarray(array).resize(new, Image.BILINEAR))
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div(255)


def write_attention_figures(backbone: nn.Module, images: Sequence[str | Path], out_dir: str | Path, *,
                            size: int | None = 480, block: int = -1, device: str = "auto",
                            precision: str = "fp32", alpha: float = 0.5) -> dict[str, list[Path]]:
    """For every image file: :func:`attention_maps` then :func:`save_attention_pngs` into
    ``out_dir/<file stem>/``. Returns ``{image path: written PNGs}``."""
    torch_device = resolve_device(device)
    backbone.to(torch_device)
    written: dict[str, list[Path]] = {}
    for path in images:
        image = load_image_tensor(path, size)
        maps = attention_maps(backbone, image, block, device=torch_device, precision=precision)
        written[str(path)] = save_attention_pngs(maps, image, Path(out_dir) / Path(path).stem, alpha)
    return written
