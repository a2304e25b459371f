"""Supervised losses against torch / numpy loop references."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labelwise.errors import ConfigError
from labelwise.losses import (
    CrossEntropyLoss,
    DiceLoss,
    WeightedSumLoss,
    build_loss,
    cross_entropy,
    deep_supervision_loss,
    focal_loss,
    lovasz_softmax_loss,
    soft_dice_loss,
)

IGNORE = 255


def make_batch(seed: int, num_classes: int = 4, shape: tuple[int, int, int] = (2, 6, 7), ignore_frac: float = 0.25):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], num_classes, *shape[1:], generator=gen) * 2
    target = torch.randint(0, num_classes, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < ignore_frac] = IGNORE
    return logits.requires_grad_(True), target


def ref_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float, weights=None, present_only=False) -> float:
    """Plain numpy soft Dice: loops over classes and pixels of the non-ignored set."""
    x = logits.detach().double().numpy()
    t = target.numpy()
    e = np.exp(x - x.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    num_classes = x.shape[1]
    losses, ws = [], []
    for c in range(num_classes):
        inter = p_sum = g_sum = 0.0
        for b, i, j in np.ndindex(*t.shape):
            if t[b, i, j] == IGNORE:
                continue
            g = 1.0 if t[b, i, j] == c else 0.0
            inter += probs[b, c, i, j] * g
            p_sum += probs[b, c, i, j]
            g_sum += g
        if present_only and g_sum == 0:
            continue
        losses.append(1.0 - (2 * inter + smooth) / (p_sum + g_sum + smooth))
        ws.append(1.0 if weights is None else float(weights[c]))
    return float(np.dot(losses, ws) / np.sum(ws))


# ----------------------------------------------------------------------------------------------
# cross-entropy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_cross_entropy_matches_torch(seed: int) -> None:
    logits, target = make_batch(seed)
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0])
    for kwargs in ({}, {"class_weights": weights}, {"label_smoothing": 0.1}, {"class_weights": weights, "label_smoothing": 0.2}):
        got = cross_entropy(logits, target, ignore_index=IGNORE, **kwargs)
        ref = F.cross_entropy(
            logits, target, weight=kwargs.get("class_weights"), ignore_index=IGNORE,
            label_smoothing=kwargs.get("label_smoothing", 0.0),
        )
        assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    # explicit weighted mean: sum_i w[t_i] * nll_i / sum_i w[t_i] over non-ignored pixels
    valid = target != IGNORE
    nll = -torch.log_softmax(logits, 1).gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)
    w = weights[target.clamp(max=3)] * valid
    manual = (nll * w).sum() / w.sum()
    assert cross_entropy(logits, target, class_weights=weights).item() == pytest.approx(manual.item(), rel=1e-6)


def test_cross_entropy_float32_under_bf16_autocast() -> None:
    logits, target = make_batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits.to(torch.bfloat16)
        loss = cross_entropy(low, target)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(low.float(), target, ignore_index=IGNORE)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize(
    "loss_fn",
    [cross_entropy, soft_dice_loss, focal_loss, lambda x, t: cross_entropy(x, t, class_weights=torch.ones(4))],
)
def test_all_ignored_gives_connected_zero(loss_fn) -> None:
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    target = torch.full((2, 5, 5), IGNORE)
    loss = loss_fn(logits, target)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        cross_entropy(torch.randn(2, 3, 8, 8), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        CrossEntropyLoss(num_classes=5)(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Dice and focal
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_dice_matches_loop_reference(seed: int) -> None:
    logits, target = make_batch(seed, num_classes=5)
    target[target == 4] = 0  # class 4 absent from the target
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    cases = [
        dict(smooth=1.0),
        dict(smooth=0.0),
        dict(smooth=1.0, class_weights=weights),
        dict(smooth=0.5, classes_present_only=True),
        dict(smooth=1.0, class_weights=weights, classes_present_only=True),
    ]
    for kw in cases:
        got = soft_dice_loss(logits, target, ignore_index=IGNORE, **kw).item()
        ref = ref_dice(logits, target, kw["smooth"], kw.get("class_weights"), kw.get("classes_present_only", False))
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6), kw


def test_dice_ignores_logits_at_ignored_pixels() -> None:
    logits, target = make_batch(1)
    mask = (target == IGNORE).unsqueeze(1).expand_as(logits)
    changed = torch.where(mask, torch.randn_like(logits) * 10, logits.detach())
    assert soft_dice_loss(changed, target).item() == pytest.approx(soft_dice_loss(logits, target).item(), rel=1e-6)


def test_dice_of_perfect_prediction_is_zero() -> None:
    _, target = make_batch(2, num_classes=3)
    onehot = F.one_hot(target.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    logits = onehot * 100.0
    assert soft_dice_loss(logits, target, smooth=1.0).item() == pytest.approx(0.0, abs=1e-6)
    wrong = torch.roll(onehot, 1, dims=1) * 100.0
    assert soft_dice_loss(wrong, target, smooth=0.0).item() == pytest.approx(1.0, abs=1e-6)


def test_focal_gamma_zero_is_cross_entropy() -> None:
    logits, target = make_batch(4)
    weights = torch.tensor([1.0, 0.2, 3.0, 1.0])
    assert focal_loss(logits, target, gamma=0.0, class_weights=weights).item() == pytest.approx(
        F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE).item(), rel=1e-6
    )
    assert focal_loss(logits, target, gamma=2.0).item() < cross_entropy(logits, target).item()


# ----------------------------------------------------------------------------------------------
# weighted sum, deep supervision, builder
# ----------------------------------------------------------------------------------------------
def test_weighted_sum_equals_sum_of_weighted_parts() -> None:
    logits, target = make_batch(5)
    loss = build_loss([{"name": "ce", "weight": 1.0}, {"name": "dice", "weight": 0.5}], num_classes=4)
    total, parts = loss(logits, target)
    assert set(parts) == {"ce", "dice"}
    assert total.item() == pytest.approx(parts["ce"].item() + 0.5 * parts["dice"].item(), rel=1e-6)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE) + 0.5 * ref_dice(logits, target, 1.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


class CountingLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return cross_entropy(logits, target)


def test_deep_supervision_sums_seven_terms() -> None:
    maps = [make_batch(s)[0] for s in range(7)]
    _, target = make_batch(0)
    output = SimpleNamespace(logits=maps[0], side_logits=maps[1:])
    counter = CountingLoss()
    value = deep_supervision_loss(counter, output, target)
    assert counter.calls == 7
    expected = sum(F.cross_entropy(m, target, ignore_index=IGNORE).item() for m in maps)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    assert deep_supervision_loss(counter, maps[0], target).item() == pytest.approx(
        F.cross_entropy(maps[0], target, ignore_index=IGNORE).item(), rel=1e-6
    )

    weighted = WeightedSumLoss([("ce", 2.0, CountingLoss()), ("dice", 1.0, DiceLoss())])
    total, parts = weighted(output, target)
    assert weighted.terms["ce"].calls == 7
    assert parts["ce"].item() == pytest.approx(expected, rel=1e-6)
    dice_sum = sum(soft_dice_loss(m, target).item() for m in maps)
    assert total.item() == pytest.approx(2.0 * expected + dice_sum, rel=1e-6)
    with pytest.raises(TypeError):
        deep_supervision_loss(counter, {"logits": maps[0]}, target)


def test_build_loss_options_and_class_weights() -> None:
    logits, target = make_batch(6)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss = build_loss(
        [{"name": "ce", "label_smoothing": 0.1}, {"name": "focal", "weight": 0.0, "gamma": 1.0}],
        num_classes=4,
        class_weights=weights,
    )
    total, parts = loss(logits, target)
    ref = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE, label_smoothing=0.1)
    assert total.item() == pytest.approx(ref.item(), rel=1e-6)
    assert set(parts) == {"ce", "focal"}


@pytest.mark.parametrize(
    "terms, needle",
    [
        ([{"name": "ce", "wieght": 1.0}], "wieght"),
        ([{"name": "hinge"}], "hinge"),
        ([{"weight": 1.0}], "name"),
        ([{"name": "dice", "gamma": 2.0}], "gamma"),
        ([{"name": "ce", "weight": -1.0}], "weight"),
        ([{"name": "ce"}, {"name": "ce"}], "duplicate"),
        ([], "non-empty"),
    ],
)
def test_build_loss_errors_name_the_bad_key(terms, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        build_loss(terms, num_classes=4)


def test_build_loss_rejects_wrong_class_weights() -> None:
    with pytest.raises(ConfigError, match="class_weights"):
        build_loss([{"name": "ce"}], num_classes=4, class_weights=torch.ones(3))


# ----------------------------------------------------------------------------------------------
# Lovász-softmax
# ----------------------------------------------------------------------------------------------
def ref_lovasz(logits: torch.Tensor, target: torch.Tensor, classes: str = "present") -> torch.Tensor:
    """Literal Lovász extension of the Jaccard loss: per class, sort the errors, and weight the
    i-th largest by J(S_i) - J(S_{i-1}) with J evaluated on explicit Python sets."""
    probs = torch.softmax(logits.double(), dim=1)
    pixels = [(b, i, j) for b, i, j in np.ndindex(*target.shape) if int(target[b, i, j]) != IGNORE]
    per_class = []
    for c in range(logits.shape[1]):
        ground = {k for k, (b, i, j) in enumerate(pixels) if int(target[b, i, j]) == c}
        if classes == "present" and not ground:
            continue
        errors = [abs((1.0 if k in ground else 0.0) - probs[b, c, i, j]) for k, (b, i, j) in enumerate(pixels)]
        order = sorted(range(len(pixels)), key=lambda k: -float(errors[k].detach()))

        def jaccard(wrong: set) -> float:
            return 1.0 - len(ground - wrong) / len(ground | wrong) if ground | wrong else 0.0

        total, previous, chosen = 0.0, 0.0, set()
        for k in order:
            chosen.add(k)
            current = jaccard(chosen)
            total = total + errors[k] * (current - previous)
            previous = current
        per_class.append(total)
    if not per_class:
        return logits.sum() * 0.0
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) if not torch.is_tensor(v) else v
                        for v in per_class]).mean()


@pytest.mark.parametrize("classes", ["present", "all"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lovasz_matches_literal_reference_in_value_and_gradient(seed: int, classes: str) -> None:
    logits, target = make_batch(seed, num_classes=4, shape=(2, 4, 5))
    target[target == 3] = 2  # class 3 absent: exercises the present / all difference
    loss = lovasz_softmax_loss(logits, target, IGNORE, classes)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = ref_lovasz(ref_logits, target, classes)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(grad, ref_grad.float(), atol=1e-6)


def test_lovasz_on_one_hot_probabilities_is_one_minus_iou() -> None:
    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, 3, (2, 9, 11), generator=gen)
    prediction = torch.randint(0, 3, (2, 9, 11), generator=gen)
    target[:, :2] = IGNORE
    logits = F.one_hot(prediction, 3).permute(0, 3, 1, 2).float() * 1e4  # softmax is exactly one-hot
    t, p = target.numpy(), prediction.numpy()
    keep = t != IGNORE
    ious = [np.sum((t == c) & (p == c) & keep) / np.sum(((t == c) | (p == c)) & keep) for c in range(3)]
    assert float(lovasz_softmax_loss(logits, target, IGNORE)) == pytest.approx(1 - np.mean(ious), abs=1e-6)


def test_lovasz_ignores_logits_at_ignored_pixels_and_builds_from_config() -> None:
    logits, target = make_batch(5)
    changed = logits.detach().clone().permute(1, 0, 2, 3)
    changed[:, target == IGNORE] = 50.0
    changed = changed.permute(1, 0, 2, 3)
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(lovasz_softmax_loss(changed, target).item())
    (grad,) = torch.autograd.grad(lovasz_softmax_loss(logits, target), logits)
    assert torch.all(grad.permute(1, 0, 2, 3)[:, target == IGNORE] == 0)
    loss = build_loss([{"name": "ce"}, {"name": "lovasz", "weight": 0.5, "classes": "all"}], num_classes=4)
    total, parts = loss(logits, target)
    assert set(parts) == {"ce", "lovasz"}
    assert parts["lovasz"].item() == pytest.approx(lovasz_softmax_loss(logits, target, classes="all").item())
    with pytest.raises(ConfigError, match="classes"):
        build_loss([{"name": "lovasz", "classes": "some"}], num_classes=4)
