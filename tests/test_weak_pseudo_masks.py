"""Pseudo-mask rule on hand-made CAMs."""

from __future__ import annotations

import pytest
import torch

from labelwise.errors import ConfigError
from labelwise.methods.weak.pseudo_masks import PseudoMaskConfig, pseudo_masks

IGNORE = 255


def test_argmax_over_tagged_classes_only() -> None:
    cams = torch.zeros(1, 3, 2, 2)
    cams[0, 0] = torch.tensor([[0.9, 0.2], [0.6, 0.1]])
    cams[0, 1] = torch.tensor([[0.1, 0.8], [0.5, 0.3]])
    cams[0, 2] = 1.0  # not tagged: never wins
    tags = torch.tensor([[1, 1, 0]])
    labels = pseudo_masks(cams, tags, PseudoMaskConfig(ignore_fraction=0.0))
    assert labels.tolist() == [[[0, 1], [0, 1]]]
    # margins 0.8, 0.6, 0.1, 0.2: ignoring 25% drops exactly the 0.1-margin pixel
    labels = pseudo_masks(cams, tags, PseudoMaskConfig(ignore_fraction=0.25))
    assert labels.tolist() == [[[0, 1], [IGNORE, 1]]]
    labels = pseudo_masks(cams, tags, PseudoMaskConfig(ignore_fraction=0.5))
    assert labels.tolist() == [[[0, 1], [IGNORE, IGNORE]]]


def test_background_where_no_tagged_class_exceeds_the_threshold() -> None:
    cams = torch.zeros(1, 3, 1, 4)
    cams[0, 1] = torch.tensor([0.9, 0.5, 0.3, 0.0])
    cams[0, 2] = torch.tensor([0.1, 0.45, 0.35, 0.2])
    tags = torch.tensor([[0, 1, 1]])  # background (class 0) needs no tag
    labels = pseudo_masks(cams, tags, PseudoMaskConfig(background_class=0, background_threshold=0.4,
                                                       ignore_fraction=0.0))
    assert labels.tolist() == [[[1, 1, 0, 0]]]


def test_single_candidate_pixels_are_kept_and_untagged_images_ignored() -> None:
    cams = torch.rand(2, 3, 4, 4)
    tags = torch.tensor([[0, 1, 0], [0, 0, 0]])
    labels = pseudo_masks(cams, tags, PseudoMaskConfig(ignore_fraction=0.5))
    assert torch.all(labels[0] == 1)  # one candidate everywhere: certain
    assert torch.all(labels[1] == IGNORE)  # no candidate at all


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="background_class"):
        pseudo_masks(torch.rand(1, 3, 2, 2), torch.ones(1, 3), PseudoMaskConfig(background_class=3))
    with pytest.raises(ConfigError, match="ignore_fraction"):
        pseudo_masks(torch.rand(1, 3, 2, 2), torch.ones(1, 3), PseudoMaskConfig(ignore_fraction=1.0))
    with pytest.raises(ValueError, match="CRF needs the images"):
        pseudo_masks(torch.rand(1, 3, 2, 2), torch.ones(1, 3), PseudoMaskConfig(crf=True))


def test_crf_path_keeps_candidates_and_labels_a_clear_split() -> None:
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, :, 8:] = 1.0  # left dark, right bright
    cams = torch.zeros(1, 3, 16, 16)
    cams[0, 0, :, :8] = 0.9
    cams[0, 0, :, 8:] = 0.3
    cams[0, 1, :, 8:] = 0.8
    cams[0, 1, :, :8] = 0.2
    cams[0, 2] = 1.0  # untagged
    labels = pseudo_masks(cams, torch.tensor([[1, 1, 0]]), PseudoMaskConfig(crf=True, ignore_fraction=0.0),
                          images=image)
    assert torch.all(labels[0, :, :8] == 0) and torch.all(labels[0, :, 8:] == 1)
