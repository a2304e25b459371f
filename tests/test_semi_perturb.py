"""Consistency-training perturbations against literal reference computations."""

from __future__ import annotations

import numpy as np
import torch

from labelwise.methods.semi.perturb import (
    StrongAugmentConfig,
    confident_pseudo_labels,
    cutmix,
    cutmix_boxes,
    feature_dropout,
    strong_photometric,
)


def test_confidence_mask_ignores_exactly_the_low_confidence_pixels() -> None:
    torch.manual_seed(0)
    probabilities = torch.softmax(3 * torch.randn(2, 4, 5, 6), 1)
    valid = torch.ones(2, 5, 6, dtype=torch.bool)
    valid[1, 0, :] = False
    labels = confident_pseudo_labels(probabilities, 0.7, valid, ignore_index=255)
    p = probabilities.numpy()
    for b in range(2):
        for i in range(5):
            for j in range(6):
                column = p[b, :, i, j]
                expected = int(np.argmax(column)) if column.max() >= 0.7 and valid[b, i, j] else 255
                assert labels[b, i, j] == expected
    assert (labels == 255).any() and (labels != 255).any()


def test_cutmix_moves_images_and_labels_with_the_same_box() -> None:
    generator = torch.Generator().manual_seed(1)
    boxes = cutmix_boxes(400, 40, 60, generator, probability=0.5)
    used = boxes.flatten(1).any(1)
    assert 0.4 < used.float().mean() < 0.6
    for box in boxes[used][:50]:
        rows, cols = torch.nonzero(box, as_tuple=True)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert int(box.sum()) == int(h * w)  # one filled rectangle
        assert 0.02 * 2400 * 0.8 <= h * w <= 0.4 * 2400 * 1.2
    images, partners = torch.rand(3, 3, 40, 60), torch.rand(3, 3, 40, 60)
    labels, partner_labels = torch.randint(0, 5, (3, 40, 60)), torch.randint(5, 9, (3, 40, 60))
    boxes = cutmix_boxes(3, 40, 60, torch.Generator().manual_seed(2), probability=1.0)
    mixed, mixed_labels = cutmix(images, labels, boxes, partners, partner_labels)
    for b in range(3):
        for i in range(40):
            for j in range(60):
                source = (partners, partner_labels) if boxes[b, i, j] else (images, labels)
                assert torch.equal(mixed[b, :, i, j], source[0][b, :, i, j])
                assert mixed_labels[b, i, j] == source[1][b, i, j]


def test_strong_view_is_seeded_and_its_parts_match_references() -> None:
    images = torch.rand(4, 3, 24, 32)
    a = strong_photometric(images, torch.Generator().manual_seed(3))
    b = strong_photometric(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, images)
    off = StrongAugmentConfig(jitter_probability=0, grayscale_probability=0, blur_probability=0)
    assert torch.equal(strong_photometric(images, None, off), images)
    gray_only = StrongAugmentConfig(jitter_probability=0, grayscale_probability=1, blur_probability=0)
    gray = strong_photometric(images, None, gray_only)
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for c in range(3):
        torch.testing.assert_close(gray[:, c], luma, atol=2e-3, rtol=0)


def test_feature_dropout_zeroes_whole_channels_and_rescales_the_rest() -> None:
    features = [torch.rand(8, 64, 5, 5) + 0.1, torch.rand(8, 32, 3, 3) + 0.1]
    dropped = feature_dropout(features, 0.5, torch.Generator().manual_seed(4))
    for f, d in zip(features, dropped):
        ratio = d / f
        per_channel = ratio.flatten(2)
        assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel))
        values = set(per_channel[..., 0].flatten().tolist())
        assert values <= {0.0, 2.0} and 0.3 < (per_channel[..., 0] == 0).float().mean() < 0.7
