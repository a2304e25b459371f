"""Confusion matrix, metrics and Hungarian matching against plain numpy loop references."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from labelwise.eval import (
    ConfusionMatrix,
    confusion_matrix,
    hungarian_match,
    matched_confusion,
    metrics_from_confusion,
    remap,
)

IGNORE = 255


# ----------------------------------------------------------------------------------------------
# independent references (explicit loops over classes)
# ----------------------------------------------------------------------------------------------
def ref_confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, num_pred: int | None = None) -> np.ndarray:
    num_pred = num_pred or num_classes
    valid = target != IGNORE
    out = np.zeros((num_classes, num_pred), dtype=np.int64)
    for t in range(num_classes):
        for p in range(num_pred):
            out[t, p] = np.sum(valid & (target == t) & (pred == p))
    return out


def ref_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    valid = target != IGNORE
    ious, accs, f1s, freqs = [], [], [], []
    for c in range(num_classes):
        tp = np.sum(valid & (pred == c) & (target == c))
        fp = np.sum(valid & (pred == c) & (target != c))
        fn = np.sum(valid & (pred != c) & (target == c))
        union = tp + fp + fn
        ious.append(tp / union if union > 0 else math.nan)
        f1s.append(2 * tp / (2 * tp + fp + fn) if union > 0 else math.nan)
        accs.append(tp / (tp + fn) if tp + fn > 0 else math.nan)
        freqs.append(tp + fn)
    n_valid = np.sum(valid)
    present_iou = [v for v in ious if not math.isnan(v)]
    present_acc = [v for v in accs if not math.isnan(v)]
    present_f1 = [v for v in f1s if not math.isnan(v)]
    fw = sum(freqs[c] / n_valid * ious[c] for c in range(num_classes) if freqs[c] > 0)
    return {
        "pixel_acc": np.sum(valid & (pred == target)) / n_valid,
        "mean_acc": sum(present_acc) / len(present_acc),
        "miou": sum(present_iou) / len(present_iou),
        "mean_f1": sum(present_f1) / len(present_f1),
        "freq_weighted_iou": fw,
        "per_class_iou": ious,
        "per_class_acc": accs,
        "per_class_f1": f1s,
    }


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Random pred/target with ignore pixels and classes absent from target and/or prediction."""
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 8))
    shape = (int(rng.integers(1, 4)), int(rng.integers(5, 20)), int(rng.integers(5, 20)))
    target_classes = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
    pred_classes = rng.choice(num_classes, size=int(rng.integers(1, num_classes + 1)), replace=False)
    target = rng.choice(target_classes, size=shape)
    pred = rng.choice(pred_classes, size=shape)
    agree = rng.random(shape) < 0.4  # make predictions partly right
    pred = np.where(agree & np.isin(target, pred_classes), target, pred)
    target = np.where(rng.random(shape) < 0.2, IGNORE, target)
    return pred.astype(np.int64), target.astype(np.int64), num_classes


def assert_same(a: float, b: float) -> None:
    if math.isnan(b):
        assert math.isnan(a)
    else:
        assert a == pytest.approx(b, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# confusion matrix and metrics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_random_cases_match_reference(seed: int) -> None:
    pred, target, num_classes = random_case(seed)
    matrix = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), num_classes, IGNORE)
    assert matrix.dtype == torch.int64 and matrix.shape == (num_classes, num_classes)
    np.testing.assert_array_equal(matrix.numpy(), ref_confusion(pred, target, num_classes))

    got = metrics_from_confusion(matrix)
    ref = ref_metrics(pred, target, num_classes)
    for key in ("pixel_acc", "mean_acc", "miou", "mean_f1", "freq_weighted_iou"):
        assert_same(getattr(got, key), ref[key])
    for key in ("per_class_iou", "per_class_acc", "per_class_f1"):
        assert len(getattr(got, key)) == num_classes
        for a, b in zip(getattr(got, key), ref[key]):
            assert_same(a, b)
    assert got.num_pixels == int(np.sum(target != IGNORE))


def test_absent_class_conventions() -> None:
    # class 2 absent from target and prediction, class 3 predicted but never in the target
    target = torch.tensor([0, 0, 1, 1, IGNORE, IGNORE])
    pred = torch.tensor([0, 3, 1, 1, 2, 3])  # preds at ignored pixels are not counted
    m = metrics_from_confusion(confusion_matrix(pred, target, 4))
    assert m.per_class_iou[0] == pytest.approx(0.5)
    assert m.per_class_iou[1] == pytest.approx(1.0)
    assert math.isnan(m.per_class_iou[2])
    assert m.per_class_iou[3] == 0.0
    assert m.miou == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m.mean_acc == pytest.approx((0.5 + 1.0) / 2)
    assert math.isnan(m.per_class_acc[3])
    assert m.pixel_acc == pytest.approx(0.75)
    assert m.per_class_f1[0] == pytest.approx(2 / 3)


def test_streaming_equals_one_shot() -> None:
    rng = np.random.default_rng(7)
    num_classes = 5
    meter = ConfusionMatrix(num_classes, ignore_index=IGNORE)
    preds, targets = [], []
    for _ in range(4):
        pred, target, _ = random_case(int(rng.integers(1000)))
        pred, target = pred % num_classes, np.where(target == IGNORE, IGNORE, target % num_classes)
        meter.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred.ravel())
        targets.append(target.ravel())
    all_pred, all_target = np.concatenate(preds), np.concatenate(targets)
    np.testing.assert_array_equal(meter.matrix.numpy(), ref_confusion(all_pred, all_target, num_classes))
    one_shot = metrics_from_confusion(confusion_matrix(torch.from_numpy(all_pred), torch.from_numpy(all_target), 5))
    assert meter.compute().to_dict() == one_shot.to_dict()  # NaN -> None compares equal

    other = ConfusionMatrix(num_classes)
    other.update(torch.from_numpy(all_pred), torch.from_numpy(all_target))
    meter.merge(other)
    np.testing.assert_array_equal(meter.matrix.numpy(), 2 * ref_confusion(all_pred, all_target, num_classes))
    meter.all_reduce()  # no process group: no-op
    meter.reset()
    assert int(meter.matrix.sum()) == 0


def test_invalid_values_raise() -> None:
    meter = ConfusionMatrix(5)
    with pytest.raises(ValueError, match="7"):
        meter.update(torch.tensor([0, 1, 2]), torch.tensor([0, 7, IGNORE]))
    with pytest.raises(ValueError, match="-1"):
        meter.update(torch.tensor([0, -1, 2]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="5"):
        meter.update(torch.tensor([0, 5, 2]), torch.tensor([0, 1, IGNORE]))
    with pytest.raises(ValueError, match="shape"):
        meter.update(torch.zeros(2, 5, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    meter.update(torch.tensor([4, 4]), torch.tensor([IGNORE, IGNORE]))  # all ignored is fine
    assert int(meter.matrix.sum()) == 0
    assert math.isnan(meter.compute().miou)


def test_to_dict_is_json_with_names_and_null() -> None:
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1])
    m = metrics_from_confusion(confusion_matrix(pred, target, 3))
    d = m.to_dict(["road", "tree", "car"])
    assert d["per_class_iou"]["car"] is None
    assert d["per_class_iou"]["road"] == pytest.approx(0.5)
    assert set(d["per_class_iou"]) == {"road", "tree", "car"}
    json.dumps(d, allow_nan=False)
    with pytest.raises(ValueError):
        m.to_dict(["a", "b"])


# ----------------------------------------------------------------------------------------------
# Hungarian matching
# ----------------------------------------------------------------------------------------------
def brute_force_best(matrix: np.ndarray) -> tuple[float, dict[int, int]]:
    """Best one-to-one class->cluster assignment of a [C, K] matrix (K >= C), by enumeration."""
    num_classes, num_clusters = matrix.shape
    best, best_assignment = -1.0, {}
    for clusters in itertools.permutations(range(num_clusters), num_classes):
        score = sum(matrix[c, clusters[c]] for c in range(num_classes))
        if score > best:
            best, best_assignment = score, {clusters[c]: c for c in range(num_classes)}
    return best, best_assignment


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_square_vs_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 6))
    target = rng.integers(0, num_classes, size=400)
    true_perm = rng.permutation(num_classes)
    clusters = np.where(rng.random(400) < 0.7, true_perm[target], rng.integers(0, num_classes, size=400))
    confusion = ref_confusion(clusters, target, num_classes)
    mapping = hungarian_match(torch.from_numpy(confusion))
    assert mapping.shape == (num_classes,) and sorted(mapping.tolist()) == list(range(num_classes))
    matched = sum(confusion[mapping[k], k] for k in range(num_classes))
    best, _ = brute_force_best(confusion)
    assert matched == best


@pytest.mark.parametrize("seed", range(6))
def test_hungarian_more_clusters_than_classes(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    num_classes = int(rng.integers(2, 5))
    num_clusters = num_classes + int(rng.integers(1, 3))
    confusion = rng.random((num_classes, num_clusters))  # real-valued: the optimum is unique
    _, assignment = brute_force_best(confusion)
    expected = np.empty(num_clusters, dtype=np.int64)
    for k in range(num_clusters):
        if k in assignment:
            expected[k] = assignment[k]
        else:  # unmatched cluster -> its most-overlapping class
            expected[k] = max(range(num_classes), key=lambda c: confusion[c, k])
    np.testing.assert_array_equal(hungarian_match(confusion), expected)


def test_matched_confusion_and_remap_vs_loops() -> None:
    rng = np.random.default_rng(3)
    num_classes, num_clusters = 3, 5
    target = rng.integers(0, num_classes, size=(2, 9, 9))
    target[0, 0, :4] = IGNORE
    clusters = rng.integers(0, num_clusters, size=(2, 9, 9))
    confusion = ref_confusion(clusters, target, num_classes, num_clusters)
    np.testing.assert_array_equal(
        confusion_matrix(torch.from_numpy(clusters), torch.from_numpy(target), num_classes, num_pred=num_clusters).numpy(),
        confusion,
    )
    mapping = hungarian_match(confusion)

    remapped_loop = clusters.copy()
    for k in range(num_clusters):
        remapped_loop[clusters == k] = mapping[k]
    np.testing.assert_array_equal(remap(clusters, mapping), remapped_loop)
    remapped_t = remap(torch.from_numpy(clusters), mapping)
    assert isinstance(remapped_t, torch.Tensor)
    np.testing.assert_array_equal(remapped_t.numpy(), remapped_loop)

    folded = matched_confusion(confusion, mapping)
    np.testing.assert_array_equal(folded, ref_confusion(remapped_loop, target, num_classes))
    with pytest.raises(ValueError):
        remap(np.array([0, num_clusters]), mapping)


def test_permuted_perfect_prediction_scores_one_after_matching() -> None:
    rng = np.random.default_rng(11)
    target = rng.integers(0, 4, size=(3, 16, 16))
    perm = np.array([2, 0, 3, 1])
    meter = ConfusionMatrix(4)
    meter.update(torch.from_numpy(perm[target]), torch.from_numpy(target))
    assert meter.compute().miou < 1.0
    mapping = hungarian_match(meter.matrix)
    m = metrics_from_confusion(matched_confusion(meter.matrix, mapping))
    assert m.miou == pytest.approx(1.0) and m.pixel_acc == pytest.approx(1.0)
