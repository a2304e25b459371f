"""Hidden Positives loss against a literal, anchor-by-anchor reference of the formulas
(DESIGN.md, "Unsupervised: Hidden Positives"), value and gradients; masks, schedule, LHP mixing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labelwise.errors import ConfigError
from labelwise.features.attention import local_positive_weights, neighbourhood_attention, row_quantile
from labelwise.losses.hidden_positives import (
    HiddenPositiveLoss,
    HiddenPositiveLossConfig,
    hidden_positive_loss,
    lambda_schedule,
    mix_neighbourhood,
    pool_criterion,
    positive_mask,
)


def _clustered(n: int, dim: int, centres: int, generator: torch.Generator, spread: float = 0.6) -> torch.Tensor:
    """Unit vectors around a few random centres, so every patch has some hidden positives."""
    centre = F.normalize(torch.randn(centres, dim, generator=generator, dtype=torch.float64), dim=1)
    which = torch.randint(0, centres, (n,), generator=generator)
    return F.normalize(centre[which] + spread * torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=1)


def _inputs(images: int = 3, patches: int = 6, seed: int = 0):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    n = images * patches
    f = _clustered(n, 8, 3, g)
    m = _clustered(n, 6, 3, g)
    z = F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=1)
    z_mix = F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=1)
    pool_ag = _clustered(7, 8, 3, g)
    pool_sp = _clustered(7, 6, 3, g)
    return z, z_mix, f, m, pool_ag, pool_sp


def literal_reference(z, z_mix, f, m, pool_ag, pool_sp, lam, patches, tau, base_tau, rho,  # noqa: ANN001, ANN201
                      agreeing=False):  # noqa: ANN001
    """Every anchor on its own, Python loops over anchors and candidates; rho is 0 or 1;
    ``agreeing``: a task-specific positive counts only when it is also a task-agnostic one."""
    n = z.shape[0]
    images = n // patches
    c_ag = [max(float(f[i] @ q) for q in pool_ag) for i in range(n)]
    c_sp = [max(float(m[i] @ q) for q in pool_sp) for i in range(n)]
    total = z.new_zeros(())
    for b in range(images):
        anchors = []
        for i in range(b * patches, (b + 1) * patches):
            ag = [j for j in range(n) if j != i and (float(f[i] @ f[j]) > c_ag[i] or float(f[i] @ f[j]) > c_ag[j])]
            sp = [j for j in range(n) if j != i and (float(m[i] @ m[j]) > c_sp[i] or float(m[i] @ m[j]) > c_sp[j])]
            if agreeing:
                sp = [j for j in sp if j in ag]
            if not ag:
                continue
            denominator = ag if rho == 0 else [j for j in range(n) if j != i]
            anchors.append((i, ag, sp, denominator, len(ag) + lam * len(sp)))
        if not anchors:
            continue
        mean_weight = sum(a[4] for a in anchors) / len(anchors)
        for codes in [z] + ([z_mix] if z_mix is not None else []):
            image_sum = z.new_zeros(())
            for i, ag, sp, denominator, weight in anchors:
                logits = {j: codes[i] @ codes[j] / tau for j in range(n)}
                lse = torch.logsumexp(torch.stack([logits[j] for j in denominator]), 0)
                log_prob = sum(logits[j] - lse for j in ag) + lam * sum((logits[j] - lse for j in sp), z.new_zeros(()))
                image_sum = image_sum - (tau / base_tau) * (weight / mean_weight) * log_prob / weight
            total = total + image_sum / len(anchors)
    return total / (2 * images)


@pytest.mark.parametrize("rho", [0.0, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.4])
@pytest.mark.parametrize("with_mix", [True, False])
def test_value_and_gradients_match_the_literal_reference(rho: float, lam: float, with_mix: bool) -> None:
    z, z_mix, f, m, pool_ag, pool_sp = _inputs()
    config = HiddenPositiveLossConfig(temperature=0.5, rho=rho, precision="fp32", chunk_elements=1)
    mix = z_mix if with_mix else None

    z_ref = z.clone().requires_grad_(True)
    mix_ref = mix.clone().requires_grad_(True) if mix is not None else None
    expected = literal_reference(z_ref, mix_ref, f, m, pool_ag, pool_sp, lam, 6, 0.5, 0.07, rho)
    expected.backward()

    z_ours = z.float().clone().requires_grad_(True)
    mix_ours = mix.float().clone().requires_grad_(True) if mix is not None else None
    stats: dict[str, float] = {}
    value = hidden_positive_loss(z_ours, f.float(), m.float(), pool_ag.float(), pool_sp.float(), lam=lam,
                                 patches_per_image=6, z_mix=mix_ours, config=config, stats=stats)
    value.backward()
    assert float(expected.detach()) != 0.0
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(z_ours.grad.double(), z_ref.grad, rtol=1e-4, atol=1e-6)
    if mix is not None:
        torch.testing.assert_close(mix_ours.grad.double(), mix_ref.grad, rtol=1e-4, atol=1e-6)
    assert 0 < stats["anchors_kept"] <= 1 and stats["positives_ag"] > 0


@pytest.mark.parametrize("precision", ["fp32", "mixed"])
def test_agreeing_task_specific_positives_match_the_literal_reference(precision: str) -> None:
    z, z_mix, f, m, pool_ag, pool_sp = _inputs(seed=3)
    lam = 0.5
    z_ref = z.clone().requires_grad_(True)
    expected = literal_reference(z_ref, None, f, m, pool_ag, pool_sp, lam, 6, 0.5, 0.07, 0.0, agreeing=True)
    expected.backward()
    paper = literal_reference(z.clone(), None, f, m, pool_ag, pool_sp, lam, 6, 0.5, 0.07, 0.0)
    assert abs(float(paper) - float(expected.detach())) > 1e-4  # the rule changes something here
    config = HiddenPositiveLossConfig(temperature=0.5, rho=0.0, precision=precision, chunk_elements=1,
                                      specific_positives="agreeing")
    z_ours = z.float().clone().requires_grad_(True)
    value = hidden_positive_loss(z_ours, f.float(), m.float(), pool_ag.float(), pool_sp.float(), lam=lam,
                                 patches_per_image=6, config=config)
    value.backward()
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=tolerance, abs=1e-6)
    if precision == "fp32":
        torch.testing.assert_close(z_ours.grad.double(), z_ref.grad, rtol=1e-4, atol=1e-6)


def test_chunking_does_not_change_value_or_gradient() -> None:
    z, z_mix, f, m, pool_ag, pool_sp = [t.float() for t in _inputs(images=4, patches=9, seed=3)]
    results = []
    for chunk in (1, 10**9):
        zz = z.clone().requires_grad_(True)
        config = HiddenPositiveLossConfig(rho=1.0, precision="fp32", chunk_elements=chunk)
        value = hidden_positive_loss(zz, f, m, pool_ag, pool_sp, lam=0.3, patches_per_image=9, z_mix=z_mix,
                                     config=config)
        value.backward()
        results.append((float(value.detach()), zz.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_bf16_products_stay_close_to_fp32() -> None:
    z, z_mix, f, m, pool_ag, pool_sp = [t.float() for t in _inputs(images=4, patches=16, seed=5)]
    values = {}
    for precision in ("fp32", "bf16"):
        config = HiddenPositiveLossConfig(rho=1.0, precision=precision)
        values[precision] = float(hidden_positive_loss(z, f, m, pool_ag, pool_sp, lam=0.5, patches_per_image=16,
                                                       z_mix=z_mix, config=config))
    assert values["bf16"] == pytest.approx(values["fp32"], rel=2e-2)


def test_random_denominator_keeps_about_rho_of_the_non_positives() -> None:
    """With rho in (0, 1) the value lies between the rho=0 and rho=1 values (more negatives, larger loss)
    and a fixed generator makes it reproducible."""
    z, z_mix, f, m, pool_ag, pool_sp = [t.float() for t in _inputs(images=4, patches=16, seed=7)]

    def run(rho: float, seed: int = 0) -> float:
        config = HiddenPositiveLossConfig(rho=rho, precision="fp32")
        return float(hidden_positive_loss(z, f, m, pool_ag, pool_sp, lam=0.0, patches_per_image=16, config=config,
                                          generator=torch.Generator().manual_seed(seed)))

    low, mid, high = run(0.0), run(0.5), run(1.0)
    assert low < mid < high
    assert run(0.5, seed=1) == run(0.5, seed=1)


def test_image_without_positives_contributes_nothing() -> None:
    z, z_mix, f, m, pool_ag, pool_sp = [t.float() for t in _inputs(images=2, patches=6, seed=1)]
    pool = torch.cat([f[:6], pool_ag])  # image 0's own features in the pool: c_i = 1, no j beats it
    stats: dict[str, float] = {}
    only_second = hidden_positive_loss(z, f, m, pool, pool_sp, lam=0.0, patches_per_image=6, stats=stats,
                                       config=HiddenPositiveLossConfig(rho=1.0, precision="fp32"))
    assert math.isfinite(float(only_second)) and stats["anchors_kept"] <= 0.5
    expected = literal_reference(z.double(), None, f.double(), m.double(), pool.double(), pool_sp.double(), 0.0, 6,
                                 0.8, 0.07, 1.0)
    assert float(only_second) == pytest.approx(float(expected), rel=1e-5)


def test_positive_mask_is_symmetric_and_excludes_self() -> None:
    g = torch.Generator().manual_seed(0)
    x = _clustered(40, 6, 4, g).float()
    c = pool_criterion(x, _clustered(9, 6, 4, g).float())
    full = positive_mask(x @ x.T, c, c, 0)
    assert torch.equal(full, full.T)
    assert not full.diagonal().any() and full.any()
    expected = torch.tensor([[i != j and (float(x[i] @ x[j]) > float(c[i]) or float(x[i] @ x[j]) > float(c[j]))
                              for j in range(40)] for i in range(40)])
    assert torch.equal(full, expected)
    chunk = positive_mask(x[10:20] @ x.T, c[10:20], c, 10)
    assert torch.equal(chunk, full[10:20])


def test_lambda_schedule_endpoints() -> None:
    assert lambda_schedule(0, 1000, 100) == 0.0
    assert lambda_schedule(100, 1000, 100) == 0.0
    assert lambda_schedule(550, 1000, 100) == pytest.approx(0.5)
    assert lambda_schedule(1000, 1000, 100) == 1.0
    assert lambda_schedule(5, 10, 20) == 0.0


def test_config_errors_name_the_key() -> None:
    for field, value in (("temperature", 0.0), ("rho", 1.5), ("precision", "fp16"), ("chunk_elements", 0)):
        with pytest.raises(ConfigError, match=field):
            HiddenPositiveLossConfig(**{field: value}).validate()


# ----------------------------------------------------------------------------- local hidden positives


def test_mix_neighbourhood_matches_a_literal_loop() -> None:
    g = torch.Generator().manual_seed(0)
    code = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 9, 4, 5, generator=g, dtype=torch.float64)
    out = mix_neighbourhood(code, weights)
    expected = torch.zeros_like(out)
    for b in range(2):
        for y in range(4):
            for x in range(5):
                inside = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if 0 <= y + dy < 4 and 0 <= x + dx < 5]
                acc = sum(weights[b, 3 * (dy + 1) + dx + 1, y, x] * code[b, :, y + dy, x + dx] for dy, dx in inside)
                expected[b, :, y, x] = acc / len(inside)
    torch.testing.assert_close(out, expected)
    # gradient reaches a neighbour in proportion to its weight
    out[0, 0, 1, 1].backward()
    assert code.grad[0, 0, 1, 2] == pytest.approx(float(weights[0, 5, 1, 1]) / 9)
    assert code.grad[0, 0, 0, 0] == pytest.approx(float(weights[0, 0, 1, 1]) / 9)


def test_uniform_attention_mixes_a_constant_code_to_the_same_constant_everywhere() -> None:
    """Borders: corners have 4 neighbours, edges 6, inside 9; dividing by that count keeps a
    constant code constant (times scale / N for flat attention)."""
    h, w = 4, 6
    attention = torch.full((1, h * w, h * w), 1.0 / (h * w))
    weights = local_positive_weights(attention, (h, w))
    scale = math.sqrt(h * w)
    inside = neighbourhood_attention(torch.ones(1, h * w, h * w), (h, w))
    torch.testing.assert_close(weights, inside * scale / (h * w))
    mixed = mix_neighbourhood(torch.full((1, 2, h, w), 3.0), weights)
    torch.testing.assert_close(mixed, torch.full_like(mixed, 3.0 * scale / (h * w)))


def test_local_positive_weights_follow_the_recipe() -> None:
    g = torch.Generator().manual_seed(0)
    h, w = 3, 4
    attention = torch.rand(2, h * w, h * w, generator=g)
    weights = local_positive_weights(attention, (h, w), scale=5.0)
    for b in range(2):
        for i in range(h * w):
            row = attention[b, i].double()
            low, high = torch.quantile(row, 0.1), torch.quantile(row, 0.9)
            processed = torch.softmax(row.clamp(float(low), float(high)), 0) * 5.0
            processed = torch.where(processed < processed.mean(), torch.zeros_like(processed), processed)
            y, x = divmod(i, w)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    expect = float(processed[(y + dy) * w + x + dx]) if 0 <= y + dy < h and 0 <= x + dx < w else 0.0
                    assert float(weights[b, 3 * (dy + 1) + dx + 1, y, x]) == pytest.approx(expect, rel=1e-5, abs=1e-7)


def test_row_quantile_matches_torch_quantile() -> None:
    x = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(2))
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        torch.testing.assert_close(row_quantile(x, q), torch.quantile(x, q, dim=-1, keepdim=True))


def test_module_form_takes_maps() -> None:
    z, z_mix, f, m, pool_ag, pool_sp = [t.float() for t in _inputs(images=2, patches=6, seed=4)]

    def maps(x: torch.Tensor) -> torch.Tensor:  # [N, C] -> [B, C, 2, 3]
        return x.reshape(2, 2, 3, -1).permute(0, 3, 1, 2)

    loss = HiddenPositiveLoss(HiddenPositiveLossConfig(rho=1.0, precision="fp32"))
    value = loss(maps(z), maps(f), maps(m), pool_ag, pool_sp, 0.2, z_mix=maps(z_mix))
    direct = hidden_positive_loss(z, f, m, pool_ag, pool_sp, lam=0.2, patches_per_image=6, z_mix=z_mix,
                                  config=HiddenPositiveLossConfig(rho=1.0, precision="fp32"))
    assert float(value) == pytest.approx(float(direct), rel=1e-6)
    assert set(loss.last_stats) == {"anchors_kept", "positives_ag", "positives_sp"}


def test_mixed_precision_selects_the_same_positives_as_fp32() -> None:
    z, z_mix, f, m, pool_ag, pool_sp = [t.float() for t in _inputs(images=4, patches=16, seed=9)]
    results = {}
    for precision in ("fp32", "mixed"):
        zz = z.clone().requires_grad_(True)
        stats: dict[str, float] = {}
        value = hidden_positive_loss(zz, f, m, pool_ag, pool_sp, lam=0.3, patches_per_image=16, z_mix=z_mix,
                                     config=HiddenPositiveLossConfig(rho=1.0, precision=precision), stats=stats)
        value.backward()
        results[precision] = (float(value.detach()), zz.grad.clone(), stats)
    assert results["mixed"][2] == results["fp32"][2]
    assert results["mixed"][0] == pytest.approx(results["fp32"][0], rel=1e-3)
    cosine = F.cosine_similarity(results["mixed"][1].flatten(), results["fp32"][1].flatten(), dim=0)
    assert float(cosine) > 0.999


def _near_threshold_case(n: int = 96, dim: int = 48, seed: int = 11):  # noqa: ANN202
    """Unit vectors and criteria placed within bfloat16 rounding of chosen pair similarities, so
    that a plain bfloat16 product misjudges some pairs (float64 reference similarities)."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    sim = x @ x.T
    partner = torch.randint(0, n, (n,), generator=g)
    offset = (1e-5 + 2e-3 * torch.rand(n, generator=g, dtype=torch.float64)) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    criterion = sim[torch.arange(n), partner] + offset
    return x, sim, criterion


def test_bf16_products_with_band_refinement_decide_like_float64() -> None:
    from labelwise.losses.hidden_positives import _fill_positive_mask, _Workspace, bf16_product_error_bound

    x, sim, criterion = _near_threshold_case()
    n, dim = x.shape
    expected = sim > torch.minimum(criterion[:, None], criterion[None, :])
    expected.fill_diagonal_(False)
    xf, cf = x.float(), criterion.float()
    x_p = xf.bfloat16()
    decided = {}
    for name, tolerance in (("refined", bf16_product_error_bound(dim, 1.0, 1.0)), ("plain", 0.0)):
        workspace = _Workspace(32, n, torch.bfloat16, torch.device("cpu"))
        out = torch.empty(n, n, dtype=torch.bool)
        for start in (0, 32, 64):  # chunks of 32 anchors against all 96
            rows = slice(start, start + 32)
            _fill_positive_mask(out[rows], xf[rows], x_p[rows], x_p.T.contiguous(), xf, cf[rows], cf, start,
                                tolerance, workspace)
        decided[name] = out
    assert torch.equal(decided["refined"], expected)
    assert not torch.equal(decided["plain"], expected)  # the case really sits inside the rounding
