"""PriMaPs mask proposals, majority labels and the EM prototype update, against literal
references (numpy loops, hand computations)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from labelwise.features.primaps import (
    em_prototype_sums,
    em_prototype_update,
    mask_majority_labels,
    nearest_prototype,
    principal_mask_proposals,
    prototypes_from_sums,
    symmetric_eigh,
)

# ---------------------------------------------------------------------------------------------
# literal reference (independent of the module under test)


def _reference_proposals(features: torch.Tensor, valid: torch.Tensor, threshold: float, coverage: float,
                         max_masks: int) -> tuple[np.ndarray, float]:
    """Per-image loop in float64 numpy with an SVD for the principal direction.

    Returns the proposals ``[B, h, w]`` and the smallest margin met on the way (gap between the
    two best anchor scores, distance of a similarity to the threshold, relative gap between the
    first two singular values), so the test can check that float32 vs float64 cannot flip a
    decision.
    """
    feats = features.double().numpy()
    batch, dim, h, w = feats.shape
    out = np.full((batch, h * w), -1, dtype=np.int64)
    margin = math.inf
    for b in range(batch):
        x = feats[b].reshape(dim, h * w).T
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        remaining = [i for i in range(h * w) if bool(valid[b].reshape(-1)[i])]
        num_valid = len(remaining)
        claimed = 0
        index = 0
        while remaining and claimed / num_valid < coverage and index < max_masks:
            rows = x[remaining]
            _, singular, vt = np.linalg.svd(rows - rows.mean(axis=0))
            if singular[0] ** 2 <= 1e-8 * float((rows ** 2).sum()):
                anchor = remaining[0]
            else:
                if len(singular) > 1:
                    margin = min(margin, (singular[0] ** 2 - singular[1] ** 2) / singular[0] ** 2)
                scores = [abs(float(unit[i] @ vt[0])) for i in remaining]
                anchor = remaining[int(np.argmax(scores))]
                if len(scores) > 1:
                    top_two = sorted(scores)[-2:]
                    margin = min(margin, top_two[1] - top_two[0])
            mask = []
            for i in remaining:
                similarity = float(unit[i] @ unit[anchor])
                if i != anchor:
                    margin = min(margin, abs(similarity - threshold))
                if similarity >= threshold or i == anchor:
                    mask.append(i)
            for i in mask:
                out[b, i] = index
            remaining = [i for i in remaining if i not in mask]
            claimed += len(mask)
            index += 1
    return out.reshape(batch, h, w), margin


def _planted_features(seed: int, batch: int, dim: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features drawn around 4 random centres per image (plus a shared offset) and a valid mask
    with about 15% invalid patches."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch, 4, dim, generator=g) * 2.0
    which = torch.randint(0, 4, (batch, h * w), generator=g)
    picked = torch.gather(centres, 1, which[..., None].expand(-1, -1, dim))
    x = picked + 0.5 * torch.randn(batch, h * w, dim, generator=g) + 0.7
    valid = torch.rand(batch, h, w, generator=g) > 0.15
    return x.transpose(1, 2).reshape(batch, dim, h, w), valid


# ---------------------------------------------------------------------------------------------
# proposals


@pytest.mark.parametrize("dim, side", [(8, 5), (32, 4)], ids=["covariance", "gram"])
@pytest.mark.parametrize("threshold, coverage, max_masks", [(0.5, 0.95, 16), (0.8, 1.0, 16), (0.3, 0.9, 3)])
def test_proposals_match_literal_reference(dim, side, threshold, coverage, max_masks):
    features, valid = _planted_features(seed=dim * 100 + side, batch=3, dim=dim, h=side, w=side)
    expected, margin = _reference_proposals(features, valid, threshold, coverage, max_masks)
    assert margin > 1e-4, "test data too close to a tie for float32 vs float64"
    got = principal_mask_proposals(features, threshold, valid=valid, coverage=coverage, max_masks=max_masks)
    assert got.dtype == torch.int64 and got.shape == (3, side, side)
    np.testing.assert_array_equal(got.numpy(), expected)
    assert (got[~valid] == -1).all()
    assert int(got.max()) < max_masks


def test_proposals_by_hand():
    # patches (flat order): e2, 2 e1, 2 e1, 2 e1. Mean (1.5, 0.25); centred rows (-1.5, 0.75) and
    # (0.5, -0.25), so the principal direction is +-(2, -1)/sqrt(5): |cos| is 2/sqrt(5) for e1 and
    # 1/sqrt(5) for e2, the anchor is patch 1 (first e1) and proposal 0 = the three e1 patches;
    # the lone e2 patch is proposal 1.
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    rows = torch.tensor([e2, [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    features = rows.T.reshape(1, 2, 2, 2)
    assert principal_mask_proposals(features, 0.5, coverage=1.0).tolist() == [[[1, 0], [0, 0]]]
    # after proposal 0, 3/4 of the patches are claimed: coverage 0.75 stops there, so does max_masks=1
    assert principal_mask_proposals(features, 0.5, coverage=0.75).tolist() == [[[-1, 0], [0, 0]]]
    assert principal_mask_proposals(features, 0.5, coverage=1.0, max_masks=1).tolist() == [[[-1, 0], [0, 0]]]
    # patch 1 invalid: e2 and two 2 e1 patches remain, (2, -1) direction again -> e1 patches first
    valid = torch.tensor([[[True, False], [True, True]]])
    assert principal_mask_proposals(features, 0.5, valid=valid, coverage=1.0).tolist() == [[[1, -1], [0, 0]]]
    # two orthogonal groups of identical vectors, batched with the first image: two masks each
    other = torch.tensor([e1, e1, e2, e2]).T.reshape(1, 2, 2, 2)
    both = principal_mask_proposals(torch.cat([features, other]), 0.5, coverage=1.0)
    assert both[0].tolist() == [[1, 0], [0, 0]]
    assert sorted(both[1].flatten().tolist()) == [0, 0, 1, 1]
    assert both[1, 0, 0] == both[1, 0, 1] and both[1, 1, 0] == both[1, 1, 1]


def test_proposals_degenerate_and_empty_images():
    same = torch.ones(1, 3, 2, 3)  # all identical: one mask, anchored at the first patch
    assert principal_mask_proposals(same, 0.9, coverage=1.0).tolist() == [[[0, 0, 0], [0, 0, 0]]]
    nothing = torch.zeros(1, 2, 3, dtype=torch.bool)
    assert (principal_mask_proposals(same, 0.9, valid=nothing) == -1).all()
    # a threshold above 1: every patch becomes its own proposal, in flat order (each round's
    # remaining set is identical -> first remaining patch anchors)
    got = principal_mask_proposals(same, 1.5, coverage=1.0)
    assert got.flatten().tolist() == [0, 1, 2, 3, 4, 5]


def test_proposals_sign_invariant_and_low_precision_input():
    features, valid = _planted_features(seed=7, batch=2, dim=8, h=5, w=5)
    base = principal_mask_proposals(features, 0.5, valid=valid)
    assert torch.equal(principal_mask_proposals(-features, 0.5, valid=valid), base)
    half = features.to(torch.bfloat16)
    assert torch.equal(principal_mask_proposals(half, 0.5, valid=valid),
                       principal_mask_proposals(half.float(), 0.5, valid=valid))


def test_proposals_reject_bad_shapes():
    with pytest.raises(ValueError):
        principal_mask_proposals(torch.zeros(2, 3, 4), 0.5)
    with pytest.raises(ValueError):
        principal_mask_proposals(torch.zeros(2, 3, 4, 4), 0.5, valid=torch.ones(2, 4, 5, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# majority labels


def _reference_majority(proposals: np.ndarray, cluster_ids: np.ndarray) -> np.ndarray:
    out = np.full_like(proposals, -1)
    for b in range(proposals.shape[0]):
        for mask in set(proposals[b].flatten().tolist()) - {-1}:
            votes = Counter(cluster_ids[b][proposals[b] == mask].tolist())
            best = max(votes.values())
            out[b][proposals[b] == mask] = min(k for k, v in votes.items() if v == best)
    return out


def test_majority_labels_match_literal_loop():
    g = torch.Generator().manual_seed(3)
    proposals = torch.randint(-1, 5, (4, 6, 6), generator=g)
    cluster_ids = torch.randint(0, 3, (4, 6, 6), generator=g)
    cluster_ids[proposals == -1] = -1  # ignored where unclaimed
    got = mask_majority_labels(proposals, cluster_ids, 3)
    np.testing.assert_array_equal(got.numpy(), _reference_majority(proposals.numpy(), cluster_ids.numpy()))
    assert torch.equal(mask_majority_labels(proposals, cluster_ids, 3, num_masks=7), got)


def test_majority_labels_ties_and_unclaimed():
    proposals = torch.tensor([[[0, 0, 1, 1], [0, 0, -1, 2]]])
    cluster_ids = torch.tensor([[[2, 1, 3, 0], [1, 2, 3, 3]]])
    # mask 0: ids 2, 1, 1, 2 -> tie, smallest id 1; mask 1: 3, 0 -> tie -> 0; mask 2: 3
    expected = [[[1, 1, 0, 0], [1, 1, -1, 3]]]
    assert mask_majority_labels(proposals, cluster_ids, 4).tolist() == expected
    assert (mask_majority_labels(torch.full((1, 2, 2), -1), torch.zeros(1, 2, 2, dtype=torch.int64), 2) == -1).all()
    with pytest.raises(ValueError):
        mask_majority_labels(proposals, cluster_ids, 3)  # id 3 out of range


# ---------------------------------------------------------------------------------------------
# E-step and M-step


def test_nearest_prototype():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    features = torch.tensor([[2.0, 0.1], [0.0, 5.0], [-0.1, -3.0], [-4.0, 1.0], [1.0, 1.0]])
    # last row: equal cosine to prototypes 0 and 1 -> first index
    assert nearest_prototype(features, prototypes).tolist() == [0, 1, 2, 2, 0]


def test_em_update_by_hand():
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0], [5.0, 0.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, -1])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]])
    before = prototypes.clone()
    # cluster 0: unit rows (0.6, 0.8) and (0, 1), mean (0.3, 0.9) -> (1, 3)/sqrt(10);
    #   0.5 (1, 0) + 0.5 (1, 3)/sqrt(10) ∝ (1 + 1/sqrt(10), 3/sqrt(10)) -> (0.811242, 0.584710)
    # cluster 1: mean (1, 0); 0.5 (0, 1) + 0.5 (1, 0) -> (1, 1)/sqrt(2)
    # cluster 2: no patches, keeps (0.6, -0.8); the -1 row is ignored
    expected = torch.tensor([[0.8112422, 0.5847103], [0.7071068, 0.7071068], [0.6, -0.8]])
    got = em_prototype_update(features, labels, prototypes, momentum=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(prototypes, before)
    sums, counts = em_prototype_sums(features, labels, 3)
    torch.testing.assert_close(sums, torch.tensor([[0.6, 1.8], [1.0, 0.0], [0.0, 0.0]]), rtol=0, atol=1e-6)
    assert counts.tolist() == [2, 1, 0]
    # momentum 1 keeps everything; momentum 0 jumps to the means
    torch.testing.assert_close(em_prototype_update(features, labels, prototypes, 1.0), prototypes)
    jumped = em_prototype_update(features, labels, prototypes, 0.0)
    torch.testing.assert_close(jumped[0], torch.tensor([1.0, 3.0]) / math.sqrt(10.0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        em_prototype_update(features, labels, prototypes, 1.5)
    with pytest.raises(ValueError):
        em_prototype_sums(features, torch.tensor([0, 0, 3, -1]), 3)


def test_accumulated_update_equals_one_shot():
    g = torch.Generator().manual_seed(11)
    features = torch.randn(60, 5, generator=g)
    labels = torch.randint(-1, 4, (60,), generator=g)
    labels[labels == 3] = -1  # cluster 3 of 5 stays empty
    prototypes = torch.nn.functional.normalize(torch.randn(5, 5, generator=g), dim=1)
    sums = torch.zeros(5, 5)
    counts = torch.zeros(5, dtype=torch.int64)
    for start in range(0, 60, 25):
        part_sums, part_counts = em_prototype_sums(features[start:start + 25], labels[start:start + 25], 5)
        sums += part_sums
        counts += part_counts
    accumulated = prototypes_from_sums(sums, counts, prototypes, 0.7)
    one_shot = em_prototype_update(features, labels, prototypes, 0.7)
    torch.testing.assert_close(accumulated, one_shot, rtol=0, atol=1e-6)
    assert torch.equal(one_shot[3], prototypes[3]) and torch.equal(one_shot[4], prototypes[4])
    torch.testing.assert_close(one_shot.norm(dim=1), torch.ones(5))


def test_symmetric_eigh_falls_back_when_lapack_fails_to_converge(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    matrices = x @ x.transpose(1, 2)
    expected_values, expected_vectors = torch.linalg.eigh(matrices)
    real_eigh = torch.linalg.eigh

    def batched_fails(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if matrix.dim() == 3 or bool(matrix[0, 0] == matrices[1, 0, 0]):  # the batch, and then image 1 alone
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", batched_fails)
    values, vectors = symmetric_eigh(matrices)
    torch.testing.assert_close(values, expected_values)
    # eigenvectors are defined up to sign: compare the projectors of the top one
    top = vectors[..., -1]
    expected_top = expected_vectors[..., -1]
    torch.testing.assert_close(top[:, :, None] * top[:, None, :], expected_top[:, :, None] * expected_top[:, None, :])
