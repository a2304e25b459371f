"""One-hot encoding, class pixel counts and class-balanced weights, against plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelwise.data import SyntheticShapes, class_balanced_weights, class_frequencies, one_hot


def _masks(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 4, (3, 7, 9), generator=gen)
    masks[0, :2] = 255
    return masks


def test_one_hot_matches_numpy() -> None:
    masks = _masks()
    out = one_hot(masks, 5)
    assert out.shape == (3, 5, 7, 9) and out.dtype == torch.float32
    ref = np.zeros((3, 5, 7, 9), dtype=np.float32)
    m = masks.numpy()
    for c in range(5):
        ref[:, c] = m == c
    assert np.array_equal(out.numpy(), ref)
    assert (out[0, :, :2] == 0).all()  # ignore pixels are all-zero
    assert torch.equal(one_hot(masks[1], 5), out[1])  # [H, W] → [C, H, W]


def test_one_hot_rejects_out_of_range() -> None:
    masks = _masks()
    masks[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        one_hot(masks, 5)


def test_class_frequencies_matches_numpy() -> None:
    masks = [_masks(s) for s in range(3)]
    counts = class_frequencies(masks, 5)
    flat = np.concatenate([m.numpy().ravel() for m in masks])
    ref = np.array([(flat == c).sum() for c in range(5)], dtype=np.float64)
    assert counts.dtype == np.float64
    assert np.array_equal(counts, ref)
    assert counts[4] == 0
    # numpy arrays and Sample dicts work too
    assert np.array_equal(class_frequencies([{"mask": m} for m in masks], 5), ref)
    assert np.array_equal(class_frequencies([m.numpy() for m in masks], 5), ref)


def test_class_frequencies_of_a_dataset() -> None:
    ds = SyntheticShapes(4, size=(24, 32), num_classes=4)
    ref = np.bincount(np.concatenate([ds[i]["mask"].numpy().ravel() for i in range(4)]), minlength=4)
    assert np.array_equal(class_frequencies(ds, 4), ref.astype(np.float64))


def test_class_frequencies_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"\[9\]"):
        class_frequencies([np.array([[0, 9]])], 4)


@pytest.mark.parametrize("method", ["inverse", "inverse_sqrt", "median_frequency", "effective_number"])
def test_weights_against_numpy(method: str) -> None:
    counts = np.array([1000.0, 10.0, 0.0, 250.0])
    present = counts > 0
    n = counts[present]
    if method == "inverse":
        raw = 1 / n
    elif method == "inverse_sqrt":
        raw = 1 / np.sqrt(n)
    elif method == "median_frequency":
        freq = n / n.sum()
        raw = np.median(freq) / freq
    else:
        raw = (1 - 0.99) / (1 - 0.99**n)
    expected = raw * n.sum() / (n * raw).sum()
    weights = class_balanced_weights(counts, method=method, beta=0.99)
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    assert np.allclose(weights.numpy()[present], expected, rtol=1e-6)
    assert np.isclose((counts * weights.numpy()).sum() / counts.sum(), 1.0, rtol=1e-6)
    assert weights[2] == weights.max()  # absent class: the largest weight of the present ones


def test_weights_errors() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        class_balanced_weights([1, 2], method="log")
    with pytest.raises(ValueError, match="every count is zero"):
        class_balanced_weights([0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        class_balanced_weights([1, -2])
