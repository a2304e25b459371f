"""k-means (seeding, distances, clustering), the k-means probe and the linear probe, against
independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from labelwise.eval.kmeans import kmeans, kmeans_plusplus, kmeans_probe, pairwise_sq_distances
from labelwise.eval.probes import bilinear_taps, interpolate_features, linear_probe
from labelwise.features.cache import write_feature_cache

STRIDE = 4


def numpy_upsample(scores: np.ndarray, size: tuple[int, int], stride: int) -> np.ndarray:
    """Bilinear (align_corners=False, edge-clamped) resize of [C, h, w] to [C, h*s, w*s], cropped."""

    def axis_matrix(n_in: int, n_out: int) -> np.ndarray:
        matrix = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) / stride - 0.5, 0.0)
            lo = min(int(np.floor(src)), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            t = src - lo
            matrix[i, lo] += 1 - t
            matrix[i, hi] += t
        return matrix

    _, h, w = scores.shape
    ay, ax = axis_matrix(h, h * stride), axis_matrix(w, w * stride)
    out = np.einsum("yh,chw,xw->cyx", ay, scores, ax)
    return out[:, : size[0], : size[1]]


def numpy_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255) -> dict:
    keep = target != ignore
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (target[keep], pred[keep]), 1)
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"pixel_acc": tp.sum() / matrix.sum(), "miou": np.nanmean(iou), "iou": iou}


def blocky_split(rng: np.random.Generator, images: int, classes: int, dim: int, grid=(4, 5), image=(14, 18),
                 noise=0.3, centres=None):
    """Per-patch class ids constant along rows or columns (stripes one patch wide, so bilinear
    upsampling only ever mixes two classes, the own one weighing >= 0.625); features = centre of
    the class + noise; labels = the patch's class on its pixels (the image is smaller than
    grid * stride: the bottom/right patches are partly padding)."""
    h, w = grid
    ids = np.empty((images, h, w), dtype=np.int64)
    for index in range(images):
        if index % 2:
            ids[index] = rng.integers(0, classes, size=(1, w))
        else:
            ids[index] = rng.integers(0, classes, size=(h, 1))
    centres = rng.normal(size=(classes, dim)) * 2 if centres is None else centres
    features = centres[ids].transpose(0, 3, 1, 2) + rng.normal(scale=noise, size=(images, dim, h, w))
    labels = np.repeat(np.repeat(ids, STRIDE, axis=1), STRIDE, axis=2)[:, : image[0], : image[1]].astype(np.uint8)
    labels[:, 0, :3] = 255  # some ignored pixels
    return features.astype(np.float32), labels, centres


# -------------------------------------------------------------------------------------- k-means


def test_pairwise_distances_match_numpy_in_batches():
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(103, 7)), rng.normal(size=(5, 7))
    expected = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    got = pairwise_sq_distances(torch.from_numpy(x), torch.from_numpy(c), batch_size=10)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)


def numpy_kmeans_plusplus(x: np.ndarray, k: int, uniforms: np.ndarray) -> list[int]:
    chosen = [min(int(uniforms[0] * len(x)), len(x) - 1)]
    closest = ((x - x[chosen[0]]) ** 2).sum(1)
    for i in range(1, k):
        cumulative = np.cumsum(closest)
        index = int(np.searchsorted(cumulative, uniforms[i] * cumulative[-1], side="right"))
        chosen.append(min(index, len(x) - 1))
        closest = np.minimum(closest, ((x - x[chosen[-1]]) ** 2).sum(1))
    return chosen


def test_kmeans_plusplus_matches_numpy_reference():
    x = np.random.default_rng(1).normal(size=(200, 4))
    for seed in range(3):
        uniforms = torch.rand(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
        got = kmeans_plusplus(torch.from_numpy(x), 6, torch.Generator().manual_seed(seed), batch_size=32)
        assert got.tolist() == numpy_kmeans_plusplus(x, 6, uniforms)
        assert len(set(got.tolist())) == 6  # distinct points are never picked twice


def test_kmeans_recovers_well_separated_blobs():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(5, 8)) * 10
    truth = rng.integers(0, 5, size=600)
    points = centres[truth] + rng.normal(size=(600, 8))
    result = kmeans(torch.from_numpy(points).float(), 5, restarts=3, seed=0, batch_size=64)
    labels = result.labels.numpy()
    # the same partition up to renaming: a bijection between found and true clusters
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == 5 and len({a for a, _ in pairs}) == 5
    expected_inertia = sum(((points[truth == c] - points[truth == c].mean(0)) ** 2).sum() for c in range(5))
    assert result.inertia == pytest.approx(expected_inertia, rel=1e-4)
    assert len(result.restart_inertias) == 3 and result.inertia == min(result.restart_inertias)


def test_kmeans_probe_on_clustered_features(tmp_path):
    rng = np.random.default_rng(3)
    centres = np.eye(4, 12) * 3  # orthogonal: the argmax of interpolated scores follows the nearest patch
    features, labels, _ = blocky_split(rng, 6, 4, 12, noise=0.05, centres=centres)
    cache = write_feature_cache(tmp_path / "c", features, [f"i{i}" for i in range(6)], labels=labels, stride=STRIDE,
                                num_classes=4)
    result = kmeans_probe(cache, 4, restarts=2, seed=0, batch_size=4)
    assert result.metrics.miou == pytest.approx(1.0) and result.metrics.pixel_acc == pytest.approx(1.0)
    assert sorted(result.mapping.tolist()) == [0, 1, 2, 3]

    # over-clustering: K = 6 against an independent numpy evaluation of the same centroids
    result = kmeans_probe(cache, 6, restarts=2, seed=1, batch_size=4)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cent = result.centroids.numpy().astype(np.float64)
    preds = []
    for image in unit:
        scores = np.einsum("dhw,kd->khw", image, cent) - (cent**2).sum(1)[:, None, None] / 2
        preds.append(numpy_upsample(scores, labels.shape[1:], STRIDE).argmax(0))
    preds = np.stack(preds)
    keep = labels != 255
    confusion = np.zeros((4, 6), dtype=np.int64)
    np.add.at(confusion, (labels[keep].astype(int), preds[keep]), 1)
    np.testing.assert_array_equal(result.confusion, confusion)
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    mapping = confusion.argmax(0)
    mapping[cols] = rows
    expected = numpy_metrics(mapping[preds], labels.astype(int), 4)
    assert result.metrics.miou == pytest.approx(expected["miou"])
    assert result.metrics.pixel_acc == pytest.approx(expected["pixel_acc"])


# -------------------------------------------------------------------------------- linear probe


def test_feature_interpolation_equals_upsampled_logits():
    rng = np.random.default_rng(4)
    features = torch.from_numpy(rng.normal(size=(3, 4, 5)).astype(np.float32))
    up = F.interpolate(features[None], size=(16, 20), mode="bilinear", align_corners=False)[0, :, :14, :18]
    ys, xs = np.divmod(np.arange(14 * 18), 18)
    got = interpolate_features(features, ys, xs, (14, 18), STRIDE)
    torch.testing.assert_close(got, up.permute(1, 2, 0).reshape(-1, 3), rtol=1e-5, atol=1e-6)
    i0, i1, t = bilinear_taps(7, 5, None)  # plain resize 5 -> 7 (unknown stride)
    line = torch.arange(5.0)[None, None, None]
    expected = F.interpolate(line, size=(1, 7), mode="bilinear", align_corners=False)[0, 0, 0].numpy()
    np.testing.assert_allclose((1 - t) * i0 + t * i1, expected, rtol=1e-6)


def test_linear_probe_separable_features_and_metrics_match_numpy(tmp_path):
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 16)) * 2
    train_f, train_l, _ = blocky_split(rng, 8, 4, 16, centres=centres)
    val_f, val_l, _ = blocky_split(rng, 5, 4, 16, centres=centres)
    names = [f"t{i}" for i in range(8)]
    train = write_feature_cache(tmp_path / "train", train_f, names, labels=train_l, stride=STRIDE, num_classes=4)
    val = write_feature_cache(tmp_path / "val", val_f, names[:5], labels=val_l, stride=STRIDE, num_classes=4)
    result = linear_probe(train, val, pixels_per_image=None, seed=0, batch_size=2)
    assert result.converged
    assert result.metrics.pixel_acc > 0.995 and result.metrics.miou > 0.99

    # features unrelated to the labels: many errors, and predictions that vary within patches,
    # so the comparison below checks the upsampling as well as the metrics
    val_f = rng.normal(size=val_f.shape).astype(np.float32) * 2
    val = write_feature_cache(tmp_path / "val2", val_f, names[:5], labels=val_l, stride=STRIDE, num_classes=4)
    result = linear_probe(train, val, pixels_per_image=None, seed=0, batch_size=2)
    assert result.metrics.pixel_acc < 0.8

    weight, bias = result.weight.numpy().astype(np.float64), result.bias.numpy().astype(np.float64)
    stored = np.asarray(val.features, dtype=np.float64)  # what the cache holds (float16)
    preds = np.stack([
        numpy_upsample(np.einsum("dhw,cd->chw", image, weight) + bias[:, None, None], val_l.shape[1:], STRIDE).argmax(0)
        for image in stored
    ])
    expected = numpy_metrics(preds, val_l.astype(int), 4)
    assert result.metrics.pixel_acc == pytest.approx(expected["pixel_acc"])
    assert result.metrics.miou == pytest.approx(expected["miou"])
    np.testing.assert_allclose(result.metrics.per_class_iou, expected["iou"])
    # the training-set fit is essentially perfect on separable data
    on_train = linear_probe(train, train, pixels_per_image=64, seed=0)
    assert on_train.metrics.pixel_acc > 0.99 and on_train.train_pixels == 8 * 64


def test_probes_need_labels(tmp_path):
    cache = write_feature_cache(tmp_path / "c", np.zeros((2, 3, 2, 2), np.float32), ["a", "b"], stride=4)
    with pytest.raises(Exception, match="needs labels"):
        kmeans_probe(cache, 2)
    with pytest.raises(Exception, match="needs labels"):
        linear_probe(cache, cache)
