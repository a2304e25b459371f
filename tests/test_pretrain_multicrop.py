"""Multi-crop augmentation: crop geometry, determinism, and the photometric operations against
independent per-pixel / scipy computations."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from labelwise.data.images import ImageFolderDataset
from labelwise.data.multicrop import (
    MultiCropAugment,
    MultiCropConfig,
    MultiCropDataset,
    color_jitter,
    gaussian_blur,
    hue_matrices,
    multicrop_collate,
    sample_crop_box,
)
from labelwise.errors import ConfigError

LUMA = (0.299, 0.587, 0.114)


@pytest.fixture
def gradient_folder(tmp_path: Path) -> Path:
    """Images whose red channel encodes x and green channel y (so a crop reveals its box)."""
    for index, (h, w) in enumerate([(60, 90), (80, 64), (50, 50), (70, 100)]):
        yy, xx = np.mgrid[0:h, 0:w]
        red = (xx + 0.5) / w * 255
        green = (yy + 0.5) / h * 255
        array = np.stack([red, green, np.full_like(red, 128.0)], -1).round().astype(np.uint8)
        Image.fromarray(array).save(tmp_path / f"img{index}.png")
    return tmp_path


def test_crop_boxes_follow_scale_and_ratio() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = sample_crop_box(60, 90, (0.25, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= x0 < x1 <= 90 and 0 <= y0 < y1 <= 60
        area = (x1 - x0) * (y1 - y0) / (60 * 90)
        ratio = (x1 - x0) / (y1 - y0)
        assert 0.25 - 1e-9 <= area <= 1.0 + 1e-9
        assert 3 / 4 - 1e-9 <= ratio <= 4 / 3 + 1e-9
    # impossible request: falls back to the largest centred box within the ratio range
    assert sample_crop_box(10, 100, (0.9, 1.0), (1.0, 1.0), np.random.default_rng(0)) == (45.0, 0.0, 55.0, 10.0)


def test_crops_show_their_boxes_and_are_deterministic(gradient_folder: Path) -> None:
    config = MultiCropConfig(global_size=24, local_size=12, local_crops=3)
    dataset = MultiCropDataset(ImageFolderDataset(gradient_folder), config, seed=5)
    item = dataset[1]
    assert item["global"].shape == (2, 3, 24, 24) and item["global"].dtype == torch.uint8
    assert item["local"].shape == (3, 3, 12, 12) and item["boxes"].shape == (2, 4)
    for view in range(2):
        x0, y0, x1, y1 = item["boxes"][view].tolist()
        crop = item["global"][view].double() / 255
        centre = 12  # pixel 12 of 24 has its centre at 12.5 / 24 of the crop
        u = 12.5 / 24
        expected_x = x0 + ((1 - u) if item["flips"][view] else u) * (x1 - x0)
        expected_y = y0 + u * (y1 - y0)
        assert float(crop[0, centre, centre]) == pytest.approx(expected_x, abs=0.03)
        assert float(crop[1, centre, centre]) == pytest.approx(expected_y, abs=0.03)
        # mirrored crops run right to left
        direction = float(crop[0, centre, -2] - crop[0, centre, 1])
        assert (direction < 0) == bool(item["flips"][view])
    again = dataset[1]
    for key in ("global", "local", "boxes", "flips"):
        assert torch.equal(item[key], again[key])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["boxes"], item["boxes"])
    other_seed = MultiCropDataset(dataset.source, config, seed=6)
    assert not torch.equal(other_seed[1]["boxes"], item["boxes"])
    batch = multicrop_collate([dataset[i] for i in range(3)])
    assert batch["global"].shape == (3, 2, 3, 24, 24) and batch["local"].shape == (3, 3, 3, 12, 12)
    assert batch["flips"].shape == (3, 2) and len(batch["name"]) == 3


def test_no_local_crops(gradient_folder: Path) -> None:
    config = MultiCropConfig(global_size=16, local_crops=0)
    item = MultiCropDataset(ImageFolderDataset(gradient_folder), config)[0]
    assert item["local"].shape == (0, 3, 48, 48)
    global_views, local_views = MultiCropAugment(config)(multicrop_collate([item, item]), torch.Generator())
    assert global_views.shape == (4, 3, 16, 16) and local_views.shape[0] == 0


def test_photometric_views_are_view_major_and_reproducible(gradient_folder: Path) -> None:
    config = MultiCropConfig(global_size=16, local_size=8, local_crops=2)
    dataset = MultiCropDataset(ImageFolderDataset(gradient_folder), config)
    batch = multicrop_collate([dataset[i] for i in range(4)])
    identity = replace(config, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0, 0.0), solarize_prob=0.0)
    global_views, local_views = MultiCropAugment(identity)(batch, torch.Generator().manual_seed(0))
    assert global_views.shape == (8, 3, 16, 16) and local_views.shape == (8, 3, 8, 8)
    assert torch.equal(global_views[5], batch["global"][1, 1].float() / 255)  # row v * B + i
    assert torch.equal(local_views[6], batch["local"][2, 1].float() / 255)
    augment = MultiCropAugment(config)
    first = augment(batch, torch.Generator().manual_seed(3))
    second = augment(batch, torch.Generator().manual_seed(3))
    third = augment(batch, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], third[0])
    assert 0 <= float(first[0].min()) and float(first[0].max()) <= 1
    # solarisation only ever touches the second global crop: with p = 1 every second-view pixel
    # above 0.5 is mirrored, the first view is not
    solar = replace(identity, solarize_prob=1.0)
    views, _ = MultiCropAugment(solar)(batch, torch.Generator())
    plain = batch["global"].transpose(0, 1).reshape(8, 3, 16, 16).float() / 255
    assert torch.equal(views[:4], plain[:4])
    assert torch.equal(views[4:], torch.where(plain[4:] >= 0.5, 1 - plain[4:], plain[4:]))


def test_color_jitter_against_per_pixel_formulas() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    b, c, s = torch.tensor([1.3, 0.7]), torch.tensor([0.6, 1.4]), torch.tensor([0.0, 1.2])
    out = color_jitter(images.clone(), b.double(), c.double(), s.double(), torch.zeros(2, dtype=torch.float64))
    for n in range(2):
        x = np.clip(images[n].numpy() * float(b[n]), 0, 1)
        mean = sum(LUMA[i] * x[i].mean() for i in range(3))
        x = np.clip(mean + (x - mean) * float(c[n]), 0, 1)
        luma = sum(LUMA[i] * x[i] for i in range(3))
        x = np.clip(luma + (x - luma) * float(s[n]), 0, 1)
        np.testing.assert_allclose(out[n].numpy(), x, atol=1e-6)
    grey = color_jitter(images.clone(), *(torch.ones(2, dtype=torch.float64),) * 3, torch.zeros(2, dtype=torch.float64),
                        torch.tensor([True, False]))
    expected_grey = sum(LUMA[i] * images[0, i] for i in range(3))
    for channel in range(3):
        assert torch.allclose(grey[0, channel], expected_grey, atol=1e-6)
    assert torch.allclose(grey[1], images[1], atol=1e-6)


def test_hue_rotation_properties() -> None:
    assert torch.allclose(hue_matrices(torch.tensor([0.0, 1.0])), torch.eye(3, dtype=torch.float64).expand(2, 3, 3),
                          atol=1e-9)
    third = hue_matrices(torch.tensor([1 / 3]))[0]
    grey = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    assert torch.allclose(third @ grey, grey, atol=1e-9)  # greys have no hue
    luma = torch.tensor(LUMA, dtype=torch.float64)
    color = torch.tensor([0.8, 0.3, 0.1], dtype=torch.float64)
    assert float(luma @ (third @ color)) == pytest.approx(float(luma @ color))  # brightness kept
    shifted = third @ color  # a third of a turn moves the dominant channel from red towards green
    assert int(shifted.argmax()) == 1


def test_gaussian_blur_matches_scipy() -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 2, 12, 12, dtype=torch.float64)
    sigma = torch.tensor([0.4, 1.0, 0.7])
    out = gaussian_blur(images, sigma)
    radius = 3  # ceil(3 * max sigma)
    for n in range(3):
        for channel in range(2):
            expected = ndimage.gaussian_filter(images[n, channel].numpy(), float(sigma[n]), mode="mirror",
                                               truncate=radius / float(sigma[n]))
            np.testing.assert_allclose(out[n, channel].numpy(), expected, atol=1e-5)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="multicrop.local_scale"):
        MultiCropConfig(local_scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="multicrop.blur_prob"):
        MultiCropConfig(blur_prob=(1.0, 2.0, 0.5))
    with pytest.raises(ConfigError, match="multicrop.global_size"):
        MultiCropConfig(global_size=4)
