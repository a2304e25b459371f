"""Paired batch augmentation: exactness of identities and flips, label safety, alignment."""

from __future__ import annotations

import pytest
import torch

from labelwise.data.transforms import AugmentConfig, PairedAugment, resize_batch, warp_pair
from labelwise.errors import ConfigError


def _batch(batch: int = 6, height: int = 40, width: int = 56, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=gen)
    masks = torch.randint(0, classes, (batch, height, width), generator=gen)
    masks[:, 0, :5] = 255  # some ignore pixels
    return images, masks


def _blocky_batch(batch: int = 4, height: int = 64, width: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose red channel encodes the mask (label k → red k/10), in 8x8 blocks so that
    nearest and bilinear sampling agree away from block edges."""
    gen = torch.Generator().manual_seed(1)
    coarse = torch.randint(0, 6, (batch, height // 8, width // 8), generator=gen)
    masks = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)
    images = torch.rand(batch, 3, height, width, generator=gen)
    images[:, 0] = masks.float() / 10.0
    return images, masks


def test_identity_settings_return_input_exactly() -> None:
    images, masks = _batch()
    aug = PairedAugment(AugmentConfig(hflip=0.0))
    out_images, out_masks = aug(images, masks)
    assert torch.equal(out_images, images) and torch.equal(out_masks, masks)


def test_hflip_matches_torch_flip() -> None:
    images, masks = _batch(batch=16)
    aug = PairedAugment(AugmentConfig(hflip=0.5))
    out_images, out_masks = aug(images, masks, generator=torch.Generator().manual_seed(3))
    flipped = [torch.equal(out_images[i], images[i].flip(-1)) for i in range(16)]
    assert 0 < sum(flipped) < 16
    for i in range(16):
        if flipped[i]:
            assert torch.equal(out_masks[i], masks[i].flip(-1))
        else:
            assert torch.equal(out_images[i], images[i]) and torch.equal(out_masks[i], masks[i])


def test_hflip_through_warp_path_matches_flip() -> None:
    images, masks = _batch(batch=4)
    aug = PairedAugment(AugmentConfig(hflip=1.0, rotate_degrees=1e-9))  # forces the affine warp
    out_images, out_masks = aug(images, masks)
    assert torch.allclose(out_images, images.flip(-1), atol=1e-4)
    assert torch.equal(out_masks, masks.flip(-1))


def test_generator_makes_it_reproducible() -> None:
    images, masks = _batch()
    aug = PairedAugment(AugmentConfig(rotate_degrees=30, scale=(0.8, 1.25), crop_size=(32, 32), brightness=0.3, hue=0.1))
    a = aug(images, masks, generator=torch.Generator().manual_seed(7))
    b = aug(images, masks, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(11)
    c = aug(images, masks)
    torch.manual_seed(11)
    d = aug(images, masks)
    assert torch.equal(c[0], d[0]) and torch.equal(c[1], d[1])


@pytest.mark.parametrize(
    "config",
    [
        AugmentConfig(rotate_degrees=45),
        AugmentConfig(scale=(0.5, 2.0), crop_size=(24, 30)),
        AugmentConfig(hflip=0.5, vflip=0.5, rotate_degrees=180, scale=(0.7, 1.4), crop_size=(48, 48)),
    ],
)
def test_mask_values_stay_in_original_set(config: AugmentConfig) -> None:
    images, masks = _batch()
    out_images, out_masks = PairedAugment(config)(images, masks, generator=torch.Generator().manual_seed(0))
    expected = config.crop_size or (40, 56)
    assert out_images.shape == (6, 3, *expected) and out_masks.shape == (6, *expected)
    assert out_masks.dtype == torch.long
    assert set(out_masks.unique().tolist()) <= set(masks.unique().tolist()) | {255}


def test_rotation_padding_is_ignore_and_black() -> None:
    images = torch.full((2, 3, 32, 32), 0.5)
    masks = torch.ones(2, 32, 32, dtype=torch.long)
    aug = PairedAugment(AugmentConfig(hflip=0.0, rotate_degrees=45), ignore_index=255)
    gen = torch.Generator().manual_seed(0)
    out_images, out_masks = aug(images, masks, generator=gen)
    corners = out_masks[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    # with this seed both angles exceed a few degrees, which puts the corners outside the input
    assert (corners == 255).all()
    assert (out_images[:, :, 0, 0] == 0).all()
    assert set(out_masks.unique().tolist()) == {1, 255}


def test_ignore_index_other_than_255() -> None:
    images, masks = _batch(classes=3)
    masks[masks == 255] = 0
    out = PairedAugment(AugmentConfig(rotate_degrees=90), ignore_index=-1)(images, masks)[1]
    assert set(out.unique().tolist()) <= {-1, 0, 1, 2}


def test_geometric_alignment_of_image_and_mask() -> None:
    images, masks = _blocky_batch()
    aug = PairedAugment(AugmentConfig(hflip=0.5, rotate_degrees=30, scale=(0.8, 1.3), crop_size=(48, 56)))
    out_images, out_masks = aug(images, masks, generator=torch.Generator().manual_seed(5))
    from_image = torch.round(out_images[:, 0] * 10).long()
    # away from edges: the 3x3 neighbourhood holds one label (no block edge, no padding rim)
    m = out_masks.float()[:, None]
    pool = torch.nn.functional.max_pool2d
    uniform = (pool(m, 3, 1, 1) == -pool(-m, 3, 1, 1))[:, 0] & (out_masks != 255)
    assert uniform.sum() > 0.3 * uniform.numel()
    agree = (from_image == out_masks)[uniform].float().mean()
    assert agree >= 0.99, float(agree)


def test_warp_pair_conventions_exact_on_pixel_grid() -> None:
    """A 90-degree rotation about the centre of a square image maps pixel centres onto pixel
    centres, so the bilinear image and the nearest mask must agree on every pixel."""
    gen = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 7, (2, 9, 9), generator=gen)
    images = (masks.float() / 10.0)[:, None].repeat(1, 3, 1, 1)
    c = 4.0  # (9 - 1) / 2
    rot = torch.tensor([[0.0, -1.0, 2 * c], [1.0, 0.0, 0.0]], dtype=torch.float64)  # (x, y) → (2c - y, x)
    out_images, out_masks = warp_pair(images, masks, rot.expand(2, 2, 3), (9, 9))
    expected = masks.transpose(1, 2).flip(2)  # out[y, x] = in[2c - x, y]
    assert torch.equal(out_masks, expected)
    assert torch.equal(torch.round(out_images[:, 0] * 10).long(), expected)


def test_photometric_changes_images_only() -> None:
    images, masks = _batch()
    aug = PairedAugment(AugmentConfig(hflip=0.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2))
    out_images, out_masks = aug(images, masks)
    assert torch.equal(out_masks, masks)
    assert not torch.allclose(out_images, images)
    assert out_images.min() >= 0 and out_images.max() <= 1
    assert out_images.shape == images.shape


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="hflip"):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ConfigError, match="scale"):
        AugmentConfig(scale=(2.0, 1.0))
    with pytest.raises(ConfigError, match="crop_size"):
        AugmentConfig(crop_size=(0, 4))


def test_bad_shapes_raise() -> None:
    images, masks = _batch()
    with pytest.raises(ValueError, match="masks"):
        PairedAugment()(images, masks[:, :10])


def test_resize_batch() -> None:
    images, masks = _batch(height=40, width=56)
    small_images, small_masks = resize_batch(images, masks, (20, 28))
    assert small_images.shape == (6, 3, 20, 28) and small_masks.shape == (6, 20, 28)
    assert set(small_masks.unique().tolist()) <= set(masks.unique().tolist())
    assert torch.equal(small_masks, masks[:, 1::2, 1::2])  # nearest at pixel centres
    same = resize_batch(images, masks, (40, 56))
    assert torch.equal(same[0], images) and torch.equal(same[1], masks)


def test_accepts_config_like_objects() -> None:
    from types import SimpleNamespace

    like = SimpleNamespace(hflip=0.0, vflip=0.0, rotate_degrees=0.0, scale=[1.0, 1.0], crop_size=[8, 8],
                           brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    aug = PairedAugment(like)
    assert aug.config.crop_size == (8, 8) and aug.config.scale == (1.0, 1.0)
    assert PairedAugment({"hflip": 1.0}).config.hflip == 1.0
    with pytest.raises(ConfigError, match="unknown key"):
        PairedAugment({"flip": 1.0})
