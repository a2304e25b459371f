"""STEGO correspondence loss, kNN partners and the clustering loss, against literal references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from labelwise.errors import ConfigError
from labelwise.losses.clustering import (
    ClusteringConfig,
    ClusteringLoss,
    cluster_pseudo_labels,
    clustering_loss,
    fit_prototypes,
)
from labelwise.losses.stego import (
    StegoConfig,
    StegoLoss,
    calibrated_shifts,
    draw_stego_samples,
    knn_indices,
    random_derangement,
    sample_knn_partner,
    stego_correspondence_loss,
    tensor_correlation,
)

# ---------------------------------------------------------------------------------------------
# literal helpers (independent of the modules under test)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum()


def _bilinear(t: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Value of ``t [C, H, W]`` at normalised ``(x, y)`` in [-1, 1], corners = cell centres, edge
    values repeated outside."""
    height, width = t.shape[1], t.shape[2]
    px = min(max((x + 1) / 2 * (width - 1), 0.0), width - 1)
    py = min(max((y + 1) / 2 * (height - 1), 0.0), height - 1)
    x0, y0 = math.floor(px), math.floor(py)
    x1, y1 = min(x0 + 1, width - 1), min(y0 + 1, height - 1)
    wx, wy = px - x0, py - y0
    return ((1 - wx) * (1 - wy) * t[:, y0, x0] + wx * (1 - wy) * t[:, y0, x1]
            + (1 - wx) * wy * t[:, y1, x0] + wx * wy * t[:, y1, x1])


def _points(t: torch.Tensor, coords: torch.Tensor) -> list[torch.Tensor]:
    """Bilinear values of ``t [C, H, W]`` at every point of ``coords [S, S, 2]``."""
    s = coords.shape[0]
    return [_bilinear(t, float(coords[i, j, 0]), float(coords[i, j, 1])) for i in range(s) for j in range(s)]


def _reference_term(pairs: list[tuple[list, list, list, list]], shift: float, cfg: StegoConfig) -> torch.Tensor:
    """One STEGO term over the batch; ``pairs[b] = (feat points a, feat points b, code points a,
    code points b)``."""
    raw = [[[float(_dot(_unit(fa), _unit(fb))) for fb in fbs] for fa in fas] for fas, fbs, _, _ in pairs]
    count = sum(len(r) * len(r[0]) for r in raw)
    mean_raw = sum(v for r in raw for row in r for v in row) / count
    if cfg.pointwise:
        centred = [[[v - sum(row) / len(row) for v in row] for row in r] for r in raw]
        mean_centred = sum(v for r in centred for row in r for v in row) / count
        fd = [[[v - mean_centred + mean_raw for v in row] for row in r] for r in centred]
    else:
        fd = raw
    total = torch.zeros((), dtype=torch.float64)
    for b, (_, _, cas, cbs) in enumerate(pairs):
        for p, ca in enumerate(cas):
            for q, cb in enumerate(cbs):
                cd = _dot(_unit(ca), _unit(cb))
                if cfg.zero_clamp:
                    cd = torch.clamp(cd, min=0.0)
                if cfg.stabilize:
                    cd = torch.clamp(cd, max=0.8)
                total = total - cd * (fd[b][p][q] - shift)
    return total / count


def _reference_centred(fas: list, fbs: list) -> list[float]:
    """Pointwise-centred feature correlations of one term over the batch (``fas[b]`` / ``fbs[b]``
    the point features of image ``b`` and of its partner), flattened."""
    raw = [[[float(_dot(_unit(fa), _unit(fb))) for fb in fbs[b]] for fa in fas[b]] for b in range(len(fas))]
    count = sum(len(r) * len(r[0]) for r in raw)
    mean_raw = sum(v for r in raw for row in r for v in row) / count
    centred = [[v - sum(row) / len(row) for v in row] for r in raw for row in r]
    mean_centred = sum(v for row in centred for v in row) / count
    return [v - mean_centred + mean_raw for row in centred for v in row]


def _reference_stego(feats, feats_knn, code, code_knn, samples, cfg):
    batch = feats.shape[0]
    fa = [_points(feats[b], samples.anchor[b]) for b in range(batch)]
    ca = [_points(code[b], samples.anchor[b]) for b in range(batch)]
    self_term = _reference_term([(fa[b], fa[b], ca[b], ca[b]) for b in range(batch)], cfg.pos_intra_shift, cfg)
    knn_pairs = [(fa[b], _points(feats_knn[b], samples.partner[b]), ca[b], _points(code_knn[b], samples.partner[b]))
                 for b in range(batch)]
    knn_term = _reference_term(knn_pairs, cfg.pos_inter_shift, cfg)
    neg_terms = []
    for perm in samples.negatives.tolist():
        pairs = [(fa[b], _points(feats[perm[b]], samples.partner[b]), ca[b], _points(code[perm[b]], samples.partner[b]))
                 for b in range(batch)]
        neg_terms.append(_reference_term(pairs, cfg.neg_inter_shift, cfg))
    rand_term = sum(neg_terms) / len(neg_terms)
    total = cfg.pos_intra_weight * self_term + cfg.pos_inter_weight * knn_term + cfg.neg_inter_weight * rand_term
    return total, float(self_term.detach()), float(knn_term.detach()), float(rand_term.detach())


# ---------------------------------------------------------------------------------------------
# STEGO


def test_tensor_correlation_matches_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 2, 3, generator=g)
    b = torch.randn(2, 3, 4, 2, generator=g)
    out = tensor_correlation(a, b)
    assert out.shape == (2, 2, 3, 4, 2)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                for p in range(4):
                    for q in range(2):
                        expected = float(_dot(_unit(a[n, :, i, j].double()), _unit(b[n, :, p, q].double())))
                        assert abs(float(out[n, i, j, p, q]) - expected) < 1e-6


def test_default_config_is_cocostuff():
    cfg = StegoConfig()
    assert (cfg.feature_samples, cfg.neg_samples) == (11, 5)
    assert (cfg.pos_intra_weight, cfg.pos_inter_weight, cfg.neg_inter_weight) == (0.67, 0.25, 0.63)
    assert (cfg.pos_intra_shift, cfg.pos_inter_shift, cfg.neg_inter_shift) == (0.08, 0.02, 0.66)
    assert (cfg.pointwise, cfg.zero_clamp, cfg.stabilize) == (True, True, False)


@pytest.mark.parametrize("variant", [{}, {"pointwise": False, "zero_clamp": False, "stabilize": True}])
def test_stego_loss_matches_literal_reference(variant):
    cfg = StegoConfig(feature_samples=3, neg_samples=2, **variant)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 5, 4, 5, generator=g)
    feats_knn = torch.randn(3, 5, 4, 5, generator=g)
    code = torch.randn(3, 4, 5, 3, generator=g).requires_grad_()
    code_knn = torch.randn(3, 4, 5, 3, generator=g).requires_grad_()

    loss, stats = stego_correspondence_loss(feats, feats_knn, code, code_knn, cfg, torch.Generator().manual_seed(7))
    loss.backward()

    samples = draw_stego_samples(3, cfg, torch.Generator().manual_seed(7))
    code64 = code.detach().double().requires_grad_()
    code_knn64 = code_knn.detach().double().requires_grad_()
    ref, ref_self, ref_knn, ref_rand = _reference_stego(feats.double(), feats_knn.double(), code64, code_knn64,
                                                        samples, cfg)
    ref.backward()
    assert loss.dtype == torch.float32
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-5
    assert stats == pytest.approx({"self_loss": ref_self, "knn_loss": ref_knn, "rand_loss": ref_rand}, abs=1e-5)
    assert code.grad is not None and code_knn.grad is not None
    assert float(code.grad.abs().max()) > 1e-4
    assert torch.allclose(code.grad.double(), code64.grad, atol=1e-5, rtol=0)
    assert torch.allclose(code_knn.grad.double(), code_knn64.grad, atol=1e-5, rtol=0)


def test_stego_module_features_get_no_grad_and_module_matches_function():
    cfg = StegoConfig(feature_samples=2, neg_samples=1)
    feats = torch.randn(2, 3, 3, 3, requires_grad=True)
    code = torch.randn(2, 4, 3, 3, requires_grad=True)
    module = StegoLoss(cfg)
    loss_m, _ = module(feats, feats, code, code, torch.Generator().manual_seed(3))
    loss_f, _ = stego_correspondence_loss(feats, feats, code, code, cfg, torch.Generator().manual_seed(3))
    assert float(loss_m.detach()) == float(loss_f.detach())
    loss_m.backward()
    assert feats.grad is None and code.grad is not None
    with pytest.raises(ValueError, match="at least 2"):
        stego_correspondence_loss(feats[:1], feats[:1], code[:1], code[:1], cfg)


def test_negative_permutations_never_map_an_image_to_itself():
    g = torch.Generator().manual_seed(0)
    seen_three = set()
    for n in range(2, 8):
        for _ in range(200):
            perm = random_derangement(n, g)
            assert sorted(perm.tolist()) == list(range(n))
            assert all(perm[i] != i for i in range(n))
            if n == 3:
                seen_three.add(tuple(perm.tolist()))
    assert seen_three == {(1, 2, 0), (2, 0, 1)}
    negatives = draw_stego_samples(4, StegoConfig(feature_samples=2, neg_samples=50), g).negatives
    assert negatives.shape == (50, 4)
    assert not bool((negatives == torch.arange(4)).any())
    with pytest.raises(ValueError):
        random_derangement(1, g)


@pytest.mark.parametrize("chunk_size", [4, 37, 1000])
def test_knn_indices_equal_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(37, 8, generator=g)
    x = pooled.double().numpy()
    n = x.shape[0]
    sims = np.array([[x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])) for j in range(n)]
                     for i in range(n)])
    got = knn_indices(pooled, 5, chunk_size=chunk_size)
    assert got.dtype == torch.long and got.shape == (37, 5)
    for i in range(n):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i]
        assert got[i].tolist() == order[:5]
    with_self = knn_indices(pooled, 3, exclude_self=False, chunk_size=chunk_size)
    for i in range(n):
        assert with_self[i].tolist() == list(np.argsort(-sims[i], kind="stable")[:3])


def test_knn_indices_reject_bad_k_and_partner_sampling():
    pooled = torch.randn(6, 4)
    with pytest.raises(ConfigError, match="k:"):
        knn_indices(pooled, 6)
    with pytest.raises(ConfigError, match="k:"):
        knn_indices(pooled, 0)
    knn = knn_indices(pooled, 3)
    index = torch.tensor([0, 2, 5, 2])
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([sample_knn_partner(knn, index, g) for _ in range(100)])
    for col, i in enumerate(index.tolist()):
        assert set(picks[:, col].tolist()) == set(knn[i].tolist())
    again = sample_knn_partner(knn, index, torch.Generator().manual_seed(5))
    assert torch.equal(again, sample_knn_partner(knn, index, torch.Generator().manual_seed(5)))


# ---------------------------------------------------------------------------------------------
# clustering


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(_dot(u.double(), v.double()) / (torch.linalg.vector_norm(u.double()) * torch.linalg.vector_norm(v.double())))


def test_cluster_pseudo_labels_explicit_argmax():
    g = torch.Generator().manual_seed(0)
    code = torch.randn(2, 3, 3, 4, generator=g)
    prototypes = torch.randn(5, 3, generator=g) * torch.tensor([[0.5], [2.0], [1.0], [3.0], [0.2]])
    labels = cluster_pseudo_labels(code, prototypes)
    assert labels.shape == (2, 3, 4) and labels.dtype == torch.long
    for b in range(2):
        for y in range(3):
            for x in range(4):
                sims = [_cos(code[b, :, y, x], prototypes[j]) for j in range(5)]
                assert int(labels[b, y, x]) == int(np.argmax(sims))


def _reference_ce(logits: list[list[float]], labels: list[int], weight=None) -> float:
    num = den = 0.0
    for row, y in zip(logits, labels):
        w = 1.0 if weight is None else float(weight[y])
        num += w * (math.log(sum(math.exp(v) for v in row)) - row[y])
        den += w
    return num / den


def _reference_logits(code: torch.Tensor, prototypes: torch.Tensor, t: float) -> list[list[float]]:
    b, _, h, w = code.shape
    return [[_cos(code[i, :, y, x], p) / t for p in prototypes] for i in range(b) for y in range(h) for x in range(w)]


@pytest.mark.parametrize("weighted", [False, True])
def test_clustering_loss_equals_hand_written_cross_entropy(weighted):
    g = torch.Generator().manual_seed(2)
    code1 = torch.randn(2, 3, 2, 3, generator=g).requires_grad_()
    code2 = (code1.detach() + 0.8 * torch.randn(2, 3, 2, 3, generator=g)).requires_grad_()
    prototypes = torch.randn(4, 3, generator=g).requires_grad_()
    weight = torch.tensor([0.5, 2.0, 1.0, 1.5]) if weighted else None
    t = 0.5
    l1 = _reference_logits(code1.detach(), prototypes.detach(), t)
    l2 = _reference_logits(code2.detach(), prototypes.detach(), t)
    y1 = [int(np.argmax(r)) for r in l1]
    y2 = [int(np.argmax(r)) for r in l2]
    assert y1 != y2  # the cross-view terms differ from the within-view ones

    single = clustering_loss(code1, None, prototypes, t, weight=weight)
    assert abs(single.item() - _reference_ce(l1, y1, weight)) < 1e-5
    both = clustering_loss(code1, code2, prototypes, t, weight=weight)
    expected = (_reference_ce(l1, y1, weight) + _reference_ce(l2, y2, weight) + _reference_ce(l1, y2, weight)
                + _reference_ce(l2, y1, weight)) / 4
    assert abs(both.item() - expected) < 1e-5

    both.backward()
    assert prototypes.grad is None
    assert code1.grad is not None and float(code1.grad.abs().sum()) > 0
    assert code2.grad is not None and float(code2.grad.abs().sum()) > 0


def test_fit_prototypes_finds_separated_directions():
    g = torch.Generator().manual_seed(0)
    directions = torch.eye(4)[:3] * 3
    codes = torch.cat([d + 0.1 * torch.randn(40, 4, generator=g) for d in directions])
    prototypes = fit_prototypes(codes, 3, seed=0, iters=20, max_points=90)
    assert prototypes.shape == (3, 4)
    assert torch.allclose(prototypes.norm(dim=1), torch.ones(3), atol=1e-5)
    best = (prototypes @ torch.eye(4)[:3].T).max(dim=0).values
    assert bool((best > 0.95).all())


def test_clustering_head_training_decreases_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 8, generator=g) * 2
    groups = torch.randint(0, 2, (4, 6, 6), generator=g)
    feats = mu[groups].permute(0, 3, 1, 2) + 0.2 * torch.randn(4, 8, 6, 6, generator=g)
    jittered = feats * 1.1 + 0.05 * torch.randn(4, 8, 6, 6, generator=g)
    head = nn.Conv2d(8, 4, 1)
    loss_fn = ClusteringLoss(4, ClusteringConfig(num_clusters=2, kmeans_iters=10, fit_points=1000, seed=0))
    with pytest.raises(RuntimeError, match="recluster"):
        loss_fn(head(feats))
    with torch.no_grad():
        loss_fn.recluster(head(feats))
    labels = loss_fn.pseudo_labels(head(feats))
    agreement = float((labels == groups).float().mean())
    assert max(agreement, 1 - agreement) > 0.95  # the two feature clusters are the two clusters
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = loss_fn(head(feats), head(jittered))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert int(loss_fn.reclusters) == 1
    state = loss_fn.state_dict()
    restored = ClusteringLoss(4, ClusteringConfig(num_clusters=2))
    restored.load_state_dict(state)
    assert torch.equal(restored.prototypes, loss_fn.prototypes) and bool(restored.fitted)


def test_balanced_recluster_sets_inverse_frequency_weights():
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.tensor([1.0, 0.0]) + 0.05 * torch.randn(30, 2, generator=g),
                       torch.tensor([0.0, 1.0]) + 0.05 * torch.randn(10, 2, generator=g)])
    loss_fn = ClusteringLoss(2, ClusteringConfig(num_clusters=2, fit_points=100, balance=True))
    protos = loss_fn.recluster(codes)
    big = int(protos[:, 0].argmax())
    weight = loss_fn.cluster_weight
    assert float(weight[1 - big] / weight[big]) == pytest.approx(3.0)
    assert float(weight.mean()) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs,field", [
    ({"feature_samples": 0}, "feature_samples"),
    ({"feature_samples": 2.5}, "feature_samples"),
    ({"neg_samples": -1}, "neg_samples"),
    ({"pos_intra_weight": -0.1}, "pos_intra_weight"),
    ({"neg_inter_shift": float("nan")}, "neg_inter_shift"),
    ({"pointwise": "yes"}, "pointwise"),
])
def test_stego_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        StegoConfig(**kwargs).validate()
    with pytest.raises(ConfigError, match=field):
        StegoLoss(StegoConfig(**kwargs))


@pytest.mark.parametrize("kwargs,field", [
    ({"num_clusters": 1}, "num_clusters"),
    ({"temperature": 0.0}, "temperature"),
    ({"kmeans_iters": 0}, "kmeans_iters"),
    ({"kmeans_restarts": 0}, "kmeans_restarts"),
    ({"fit_points": 3}, "fit_points"),
    ({"seed": -1}, "seed"),
    ({"balance": 1}, "balance"),
])
def test_clustering_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ClusteringConfig(**kwargs).validate()
    with pytest.raises(ConfigError, match=field):
        ClusteringLoss(4, ClusteringConfig(**kwargs))


def test_losses_run_in_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 6, 4, 4, generator=g)
    head = nn.Conv2d(6, 5, 1)
    cfg = StegoConfig(feature_samples=3, neg_samples=1)
    prototypes = torch.randn(3, 5, generator=g)
    plain, _ = stego_correspondence_loss(feats, feats.flip(0), head(feats), head(feats.flip(0)), cfg,
                                         torch.Generator().manual_seed(1))
    plain_cluster = clustering_loss(head(feats), None, prototypes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        code = head(feats)
        assert code.dtype == torch.bfloat16
        mixed, _ = stego_correspondence_loss(feats, feats.flip(0), code, head(feats.flip(0)), cfg,
                                             torch.Generator().manual_seed(1))
        mixed_cluster = clustering_loss(code, None, prototypes)
    assert mixed.dtype == torch.float32 and mixed_cluster.dtype == torch.float32
    assert abs(float(mixed.detach()) - float(plain.detach())) < 0.02
    assert abs(float(mixed_cluster.detach()) - float(plain_cluster.detach())) < 0.02


def test_calibrated_shifts_are_quantiles_of_the_centred_correlations():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64)
    feats_knn = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64)
    cfg = StegoConfig(feature_samples=3, neg_samples=2)
    quantiles = (0.5, 0.25, 0.9)
    shifts = calibrated_shifts(feats, feats_knn, quantiles, cfg, torch.Generator().manual_seed(7))
    samples = draw_stego_samples(3, cfg, torch.Generator().manual_seed(7))  # the same draws
    fa = [_points(feats[b], samples.anchor[b]) for b in range(3)]
    fk = [_points(feats_knn[b], samples.partner[b]) for b in range(3)]
    negatives = []
    for perm in samples.negatives.tolist():
        negatives += _reference_centred(fa, [_points(feats[perm[b]], samples.partner[b]) for b in range(3)])
    expected = [np.quantile(_reference_centred(fa, fa), 0.5), np.quantile(_reference_centred(fa, fk), 0.25),
                np.quantile(negatives, 0.9)]
    assert shifts == pytest.approx(expected, abs=1e-9)
    # the shift is the attract / repel line: a quantile q leaves a fraction 1 - q of the pairs above it
    assert np.mean(np.array(negatives) > shifts[2]) == pytest.approx(0.1, abs=0.02)
