"""DINO multi-crop augmentation: 2 global crops and N local crops of every image.

Each image gives two *global* crops (random resized crop, area ``global_scale`` of the image,
``global_size`` px square) and ``local_crops`` *local* crops (area ``local_scale``,
``local_size`` px), each randomly mirrored, then color-jittered (p 0.8: brightness, contrast,
saturation, hue), turned grey (p 0.2), blurred (p 1.0 for the first global crop, 0.1 for the
second, 0.5 for local crops) and, for the second global crop only, solarised (p 0.2), as in DINO.

Where the work runs. Measured on the 2-core AMX CPU this project targets, one batch of 64
images (128 global crops of 96 px, 384 local crops of 48 px), CPU seconds on one thread:

* The *geometric* part runs per sample, in the dataset (:class:`MultiCropDataset`, so in
  DataLoader workers when ``num_workers > 0``): images differ in size, so each must be decoded
  and cropped on its own anyway, and PIL's ``resize(box=...)`` crops and resamples (with
  antialiasing) in one C call from the decoded uint8 image: ~0.1 s per batch, decoding
  included. Crops leave the dataset as uint8 (4x less inter-process traffic than float).
* The *photometric* part runs batched on the collated crops (:class:`MultiCropAugment`, in the
  training process, on the training device): the crops have fixed sizes, so each operation is
  one vectorised tensor operation over all crops of a view type: 0.04-0.06 s per batch,
  against 0.15-0.24 s for the same operations per sample with PIL (``ImageEnhance``, HSV hue,
  ``GaussianBlur``, ``solarize``) in workers. Saturation, hue and greying are folded into one
  3x3 color matrix per crop (hue as a rotation in YIQ space): the whole jitter takes 7 ms,
  where kornia's HSV ``adjust_hue`` alone took ~0.1 s for the global crops.

On 2 cores a worker process does not add compute, it only overlaps with the training step's
two threads (and competes with them), so the cheaper placement wins: the 4x cheaper batched
photometry in the training process, and only the unavoidable per-image work per sample.

Randomness: the crop geometry of sample ``i`` in epoch ``e`` depends only on ``(seed, e, i)``
(whichever worker draws it); the photometric part draws from the generator it is given (the
pretraining step function seeds one from ``(seed, step, rank)``). Both make ``--resume`` exact.

Crop boxes (normalised ``x0, y0, x1, y1`` in the source image) and flip flags of the global crops
travel with the batch, so dense objectives can match locations of the two global views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from labelwise.data.images import ImageFolderDataset
from labelwise.errors import ConfigError

#: ITU-R 601 luma weights (what grey conversion and saturation use).
LUMA = (0.299, 0.587, 0.114)


@dataclass
class MultiCropConfig:
    """Multi-crop settings (DINO defaults, crop sizes scaled down for CPU training).

    Attributes:
        global_size: side in pixels of the two global crops.
        local_size: side in pixels of the local crops.
        local_crops: number of local crops per image (0: global crops only).
        global_scale: ``(lo, hi)`` fraction of the image area a global crop covers.
        local_scale: ``(lo, hi)`` fraction of the image area a local crop covers.
        ratio: ``(lo, hi)`` aspect ratio (w / h) range of a crop box, drawn log-uniformly.
        hflip: probability of mirroring a crop.
        jitter_prob: probability of color jitter; ``brightness``, ``contrast``, ``saturation``
            factors are drawn in ``[1 - v, 1 + v]`` and the hue shift in ``[-hue, hue]`` (fraction
            of the color circle).
        grayscale_prob: probability of turning a crop grey.
        blur_prob: blur probability of (first global crop, second global crop, local crops).
        blur_sigma: ``(lo, hi)`` Gaussian sigma range in output pixels (DINO's 0.1-2.0 at 224 px
            is about 0.1-1.0 at 96 px).
        solarize_prob: probability of solarising the second global crop.
    """

    global_size: int = 96
    local_size: int = 48
    local_crops: int = 6
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    solarize_prob: float = 0.2

    def __post_init__(self) -> None:
        for key in ("global_size", "local_size"):
            if getattr(self, key) < 8:
                raise ConfigError(f"multicrop.{key}: must be >= 8 pixels, got {getattr(self, key)}")
        if self.local_crops < 0:
            raise ConfigError(f"multicrop.local_crops: must be >= 0, got {self.local_crops}")
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"multicrop.{key}: need 0 < lo <= hi <= 1, got {getattr(self, key)}")
            setattr(self, key, (float(lo), float(hi)))
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"multicrop.ratio: need 0 < lo <= hi, got {self.ratio}")
        for key in ("hflip", "jitter_prob", "grayscale_prob", "solarize_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"multicrop.{key}: a probability in [0, 1] is required, got {getattr(self, key)}")
        if any(not 0 <= p <= 1 for p in self.blur_prob):
            raise ConfigError(f"multicrop.blur_prob: probabilities in [0, 1] are required, got {self.blur_prob}")
        for key in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"multicrop.{key}: must be in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"multicrop.hue: must be in [0, 0.5], got {self.hue}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"multicrop.blur_sigma: need 0 < lo <= hi, got {self.blur_sigma}")

    @property
    def num_crops(self) -> int:
        return 2 + self.local_crops


# ----------------------------------------------------------------------------- geometry


def sample_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                    rng: np.random.Generator, attempts: int = 10) -> tuple[float, float, float, float]:
    """A random-resized-crop box ``(x0, y0, x1, y1)`` in pixels (floats) inside ``width x height``.

    Area fraction uniform in ``scale``, aspect ratio (w / h) log-uniform in ``ratio``; after
    ``attempts`` boxes that do not fit, the largest centred box with a ratio in range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            return x0, y0, x0 + w, y0 + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = float(width), width / ratio[0]
    elif aspect > ratio[1]:
        w, h = height * ratio[1], float(height)
    else:
        w, h = float(width), float(height)
    x0, y0 = (width - w) / 2, (height - h) / 2
    return x0, y0, x0 + w, y0 + h


def crop_resize(image: Image.Image, box: tuple[float, float, float, float], size: int, flip: bool) -> np.ndarray:
    """Crop ``box`` out of ``image`` and resample it to ``size x size`` (bilinear, antialiased)
    in one step; mirror it when ``flip``. Returns uint8 ``[3, size, size]``."""
    out = np.asarray(image.resize((size, size), Image.BILINEAR, box=box))
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


class MultiCropDataset(Dataset):
    """The geometric half of multi-crop over an :class:`ImageFolderDataset`.

    Item ``i``::

        {"global": uint8 [2, 3, G, G], "local": uint8 [N, 3, L, L],
         "boxes": float32 [2, 4] global crop boxes (x0, y0, x1, y1) as fractions of the image,
         "flips": bool [2] whether each global crop is mirrored, "name": str}

    The geometry of item ``i`` in epoch ``e`` is drawn from a generator seeded by
    ``(seed, e, i)``; the trainer calls :meth:`set_epoch` before each epoch.
    """

    def __init__(self, source: ImageFolderDataset, config: MultiCropConfig, seed: int = 0) -> None:
        self.source = source
        self.config = config
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cfg = self.config
        rng = np.random.default_rng([self.seed, self.epoch, index])
        array = self.source.load(index)
        height, width = array.shape[:2]
        image = Image.fromarray(array)
        globals_, boxes, flips = [], [], []
        for _ in range(2):
            box = sample_crop_box(height, width, cfg.global_scale, cfg.ratio, rng)
            flip = bool(rng.random() < cfg.hflip)
            globals_.append(crop_resize(image, box, cfg.global_size, flip))
            boxes.append((box[0] / width, box[1] / height, box[2] / width, box[3] / height))
            flips.append(flip)
        locals_ = []
        for _ in range(cfg.local_crops):
            box = sample_crop_box(height, width, cfg.local_scale, cfg.ratio, rng)
            locals_.append(crop_resize(image, box, cfg.local_size, bool(rng.random() < cfg.hflip)))
        local = (torch.from_numpy(np.stack(locals_)) if locals_
                 else torch.zeros(0, 3, cfg.local_size, cfg.local_size, dtype=torch.uint8))
        return {
            "global": torch.from_numpy(np.stack(globals_)),
            "local": local,
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "flips": torch.tensor(flips),
            "name": self.source.names[index],
        }


def multicrop_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack :class:`MultiCropDataset` items: ``global`` uint8 ``[B, 2, 3, G, G]``, ``local``
    uint8 ``[B, N, 3, L, L]``, ``boxes`` ``[B, 2, 4]``, ``flips`` ``[B, 2]``, ``name`` list."""
    if not samples:
        raise ValueError("multicrop_collate: empty batch")
    batch: dict[str, Any] = {key: torch.stack([s[key] for s in samples]) for key in ("global", "local", "boxes", "flips")}
    batch["name"] = [s["name"] for s in samples]
    return batch


# ----------------------------------------------------------------------------- photometry


def to_float_views(crops: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, V, 3, S, S]`` -> float32 ``[V * B, 3, S, S]`` in [0, 1], view-major (all images'
    view 0 first, as DINO orders the crops)."""
    return crops.transpose(0, 1).reshape(-1, *crops.shape[2:]).float().div_(255.0)


def hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """RGB -> RGB 3x3 matrices ``[B, 3, 3]`` rotating chroma in YIQ space by ``shift`` turns
    (the direction of an HSV hue shift of the same amount, without the HSV round trip)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=torch.float64)
    angle = -2 * math.pi * shift.to(torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(shift.shape[0], 3, 3, dtype=torch.float64)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    return torch.linalg.inv(to_yiq) @ rotation @ to_yiq


def saturation_matrices(factor: torch.Tensor) -> torch.Tensor:
    """RGB -> RGB matrices ``[B, 3, 3]`` blending each pixel with its luma: ``luma + f (x - luma)``
    (``f = 0``: grey, 1: unchanged)."""
    luma = torch.tensor(LUMA, dtype=torch.float64).expand(3, 3)
    f = factor.to(torch.float64).view(-1, 1, 1)
    return f * torch.eye(3, dtype=torch.float64) + (1 - f) * luma


def color_jitter(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                 hue: torch.Tensor, to_grey: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image color jitter of ``images [B, 3, H, W]`` in [0, 1] (modified in place).

    Factors ``[B]`` (1 = no change; ``hue`` a shift in turns, 0 = none) apply in this order:
    brightness (scale), contrast (blend with the mean luma), then saturation, hue and the
    optional greying (``to_grey`` bool ``[B]``) as one 3x3 color matrix per image; the result
    is clamped to [0, 1] after each of the three steps. Folding the last three into one matrix
    product is what keeps this fast (one pass instead of three broadcasts).
    """
    b = images.shape[0]
    images = images.mul_(brightness.view(b, 1, 1, 1).to(images.dtype)).clamp_(0, 1)
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    mean = images.mean((2, 3)) @ weights  # [B]
    c = contrast.to(images.dtype)
    images = images.mul_(c.view(b, 1, 1, 1)).add_(((1 - c) * mean).view(b, 1, 1, 1)).clamp_(0, 1)
    matrices = hue_matrices(hue.cpu()) @ saturation_matrices(saturation.cpu())
    if to_grey is not None:
        grey_matrix = torch.tensor(LUMA, dtype=torch.float64).expand(3, 3)
        matrices = torch.where(to_grey.cpu().view(b, 1, 1), grey_matrix @ matrices, matrices)
    matrices = matrices.to(images.device, images.dtype)
    return torch.bmm(matrices, images.reshape(b, 3, -1)).view_as(images).clamp_(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``images [B, C, H, W]`` with its own Gaussian ``sigma [B]`` (pixels;
    separable, reflect padding, kernel radius ``ceil(3 * max sigma)``)."""
    b, c, h, w = images.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, h - 1, w - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.to(images.device, torch.float32)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images.dtype)  # [B, K]
    kernel = kernel.repeat_interleave(c, 0)  # [B * C, K]
    x = images.reshape(1, b * c, h, w)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(b * c, 1, 1, -1), groups=b * c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return x.view(b, c, h, w)


class MultiCropAugment:
    """The photometric half of multi-crop, batched over the crops of a collated batch.

    ``__call__(batch, generator)`` takes a :func:`multicrop_collate` batch and returns
    ``(global_views float [2 * B, 3, G, G], local_views float [N * B, 3, L, L])`` in [0, 1],
    view-major (rows ``v * B + i`` hold view ``v`` of image ``i``).
    """

    def __init__(self, config: MultiCropConfig) -> None:
        self.config = config

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        views = to_float_views(batch["global"])
        b = views.shape[0] // 2
        blur = torch.cat([torch.full((b,), cfg.blur_prob[0]), torch.full((b,), cfg.blur_prob[1])])
        solarize = torch.cat([torch.zeros(b), torch.full((b,), cfg.solarize_prob)])
        global_views = self.photometric(views, blur, solarize, generator)
        if batch["local"].shape[1] == 0:
            return global_views, views.new_zeros(0, 3, cfg.local_size, cfg.local_size)
        local_views = to_float_views(batch["local"])
        count = local_views.shape[0]
        local_views = self.photometric(local_views, torch.full((count,), cfg.blur_prob[2]), torch.zeros(count), generator)
        return global_views, local_views

    def photometric(self, images: torch.Tensor, blur_prob: torch.Tensor, solarize_prob: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Jitter / grey / blur / solarise ``images [B, 3, S, S]`` (any device) with per-image
        probabilities ``blur_prob [B]`` and ``solarize_prob [B]`` (CPU). Every random number is
        drawn, whether used or not, so the stream does not depend on the outcomes."""
        cfg = self.config
        n = images.shape[0]
        device = images.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=generator)

        def chance(p: float | torch.Tensor) -> torch.Tensor:
            return torch.rand(n, generator=generator) < p

        jitter = chance(cfg.jitter_prob)
        factors = [uniform(1 - v, 1 + v) for v in (cfg.brightness, cfg.contrast, cfg.saturation)]
        shift = uniform(-cfg.hue, cfg.hue)
        to_grey = chance(cfg.grayscale_prob)
        blur = chance(blur_prob)
        sigma = uniform(*cfg.blur_sigma)
        solar = chance(solarize_prob)
        factors = [torch.where(jitter, f, torch.ones(n)) for f in factors]
        shift = torch.where(jitter, shift, torch.zeros(n))
        if jitter.any() or to_grey.any():
            images = color_jitter(images, *[f.to(device) for f in factors], shift, to_grey)
        if blur.any():
            chosen = blur.nonzero().squeeze(1)
            images = images.index_copy(0, chosen.to(device), gaussian_blur(images[chosen.to(device)], sigma[chosen]))
        if solar.any():
            chosen = solar.nonzero().squeeze(1).to(device)
            picked = images[chosen]
            images = images.index_copy(0, chosen, torch.where(picked >= 0.5, 1.0 - picked, picked))
        return images.contiguous()
