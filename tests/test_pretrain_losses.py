"""Pretraining losses against literal, loop-by-loop reference computations written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labelwise.losses.contrastive import FeatureQueue, dense_info_nce, info_nce, sample_at, view_correspondence
from labelwise.losses.dino import DINOHead, DINOLoss, PatchDistillationLoss, block_masks, teacher_temperature
from labelwise.losses.rotation import RotationHead, rotate_images, rotation_loss


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def _cross(p: list[float], log_q: list[float]) -> float:
    return -sum(a * b for a, b in zip(p, log_q))


# ----------------------------------------------------------------------------- DINO


def test_teacher_temperature_schedule() -> None:
    assert teacher_temperature(0, 0.04, 0.07, 10) == pytest.approx(0.04)
    assert teacher_temperature(5, 0.04, 0.07, 10) == pytest.approx(0.055)
    assert teacher_temperature(10, 0.04, 0.07, 10) == pytest.approx(0.07)
    assert teacher_temperature(500, 0.04, 0.07, 10) == pytest.approx(0.07)
    assert teacher_temperature(0, 0.04, 0.07, 0) == pytest.approx(0.07)


def _reference_dino(student: torch.Tensor, teacher: torch.Tensor, center: list[float], t_temp: float,
                    s_temp: float, momentum: float) -> tuple[float, list[float]]:
    """student [V][B][K], teacher [T][B][K] as nested lists; loops over crop pairs and samples."""
    views, globals_, batch = len(student), len(teacher), len(student[0])
    total, terms = 0.0, 0
    for t in range(globals_):
        for v in range(views):
            if v == t:
                continue  # same crop seen by both: skipped
            pair = 0.0
            for b in range(batch):
                p = _softmax([(x - c) / t_temp for x, c in zip(teacher[t][b], center)])
                log_q = _log_softmax([x / s_temp for x in student[v][b]])
                pair += _cross(p, log_q)
            total += pair / batch
            terms += 1
    rows = [teacher[t][b] for t in range(globals_) for b in range(batch)]
    mean = [sum(r[k] for r in rows) / len(rows) for k in range(len(center))]
    new_center = [c * momentum + m * (1 - momentum) for c, m in zip(center, mean)]
    return total / terms, new_center


def test_dino_loss_matches_literal_reference_with_centre_and_schedule() -> None:
    torch.manual_seed(0)
    views, batch, k = 4, 3, 5
    loss_fn = DINOLoss(k, student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_steps=4, center_momentum=0.9)
    center = [0.0] * k
    for step in (0, 2, 7):  # warm-up start, mid-way, after the warm-up; the centre carries over
        student = torch.randn(views, batch, k, dtype=torch.float64)
        teacher = torch.randn(2, batch, k, dtype=torch.float64)
        t_temp = {0: 0.04, 2: 0.055, 7: 0.07}[step]
        expected, center = _reference_dino(student.tolist(), teacher.tolist(), center, t_temp, 0.1, 0.9)
        loss = loss_fn(student, teacher, step)
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        assert loss_fn.center[0].tolist() == pytest.approx(center, rel=1e-5, abs=1e-7)


def test_dino_loss_gradient_reaches_student_only() -> None:
    student = torch.randn(3, 2, 4, requires_grad=True)
    teacher = torch.randn(2, 2, 4, requires_grad=True)
    DINOLoss(4)(student, teacher, 0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_dino_head_normalised_last_layer() -> None:
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=6, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(5, 8)
    out = head(x)
    assert out.shape == (5, 6)
    assert not head.weight_g.requires_grad
    # a unit bottleneck against unit-norm prototypes: cosine similarities
    assert out.abs().max() <= 1.0 + 1e-5
    with torch.no_grad():
        head.weight_v.mul_(7.0)  # the scale of v does not matter: rows are normalised
    assert torch.allclose(head(x), out, atol=1e-6)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    assert torch.allclose(out, bottleneck @ F.normalize(head.weight_v, dim=1).t(), atol=1e-6)
    assert DINOHead(8, 6, norm_last_layer=False).weight_g.requires_grad


# ----------------------------------------------------------------------------- iBOT


def test_patch_distillation_matches_literal_reference() -> None:
    torch.manual_seed(1)
    images, patches, k = 4, 6, 5
    student = torch.randn(images, patches, k, dtype=torch.float64)
    teacher = torch.randn(images, patches, k, dtype=torch.float64)
    masks = torch.zeros(images, patches, dtype=torch.bool)
    masks[0, [1, 2]] = True
    masks[2, [0, 3, 4, 5]] = True  # images 1 and 3 have no masked patch
    loss_fn = PatchDistillationLoss(k, student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                    warmup_teacher_temp_steps=10, center_momentum=0.9)
    t_temp = 0.04 + 0.03 * 3 / 10
    # reference: per image, the mean over its masked patches; then the mean over all images
    total = 0.0
    masked_rows = []
    for i in range(images):
        terms = []
        for j in range(patches):
            if not masks[i, j]:
                continue
            p = _softmax([x / t_temp for x in teacher[i, j].tolist()])  # centre is 0 at the start
            log_q = _log_softmax([x / 0.1 for x in student[i, j].tolist()])
            terms.append(_cross(p, log_q))
            masked_rows.append(teacher[i, j].tolist())
        total += sum(terms) / len(terms) if terms else 0.0
    expected = total / images
    image_index, position = masks.nonzero(as_tuple=True)
    loss = loss_fn(student[image_index, position], teacher[image_index, position], image_index, images, 3)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    mean = [sum(r[c] for r in masked_rows) / len(masked_rows) for c in range(k)]
    assert loss_fn.center[0].tolist() == pytest.approx([0.1 * m for m in mean], rel=1e-5)


def test_block_masks() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = block_masks(200, 6, 6, prob=1.0, ratio=(0.2, 0.4), generator=generator)
    assert masks.shape == (200, 36) and masks.dtype == torch.bool
    fractions = masks.float().mean(1)
    assert fractions.min() > 0 and fractions.max() <= 0.4 + 1e-6
    assert 0.2 < float(fractions.mean()) < 0.4
    assert not block_masks(10, 6, 6, prob=0.0).any()
    half = block_masks(400, 6, 6, prob=0.5, generator=torch.Generator().manual_seed(1))
    assert 0.4 < float(half.any(1).float().mean()) < 0.6
    again = block_masks(200, 6, 6, prob=1.0, ratio=(0.2, 0.4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    # masks are blocks: a masked patch usually has a masked 4-neighbour
    grid = masks.view(200, 6, 6)
    neighbour = torch.zeros_like(grid)
    neighbour[:, 1:] |= grid[:, :-1]
    neighbour[:, :-1] |= grid[:, 1:]
    neighbour[:, :, 1:] |= grid[:, :, :-1]
    neighbour[:, :, :-1] |= grid[:, :, 1:]
    assert float((grid & neighbour).sum()) / float(grid.sum()) > 0.8


# ----------------------------------------------------------------------------- InfoNCE


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))


def _reference_info_nce(q: list[list[float]], k: list[list[float]], negatives: list[list[float]] | None,
                        temperature: float) -> float:
    total = 0.0
    for i in range(len(q)):
        positive = _cos(q[i], k[i]) / temperature
        if negatives is None:
            others = [_cos(q[i], k[j]) / temperature for j in range(len(k)) if j != i]
        else:
            others = [_cos(q[i], n) / temperature for n in negatives]
        denominator = math.exp(positive) + sum(math.exp(o) for o in others)
        total += -(positive - math.log(denominator))
    return total / len(q)


@pytest.mark.parametrize("use_queue", [True, False])
def test_info_nce_matches_literal_reference(use_queue: bool) -> None:
    torch.manual_seed(2)
    q = torch.randn(5, 4, dtype=torch.float64)
    k = torch.randn(5, 4, dtype=torch.float64)
    negatives = torch.randn(7, 4, dtype=torch.float64) if use_queue else None
    expected = _reference_info_nce(q.tolist(), k.tolist(), negatives.tolist() if use_queue else None, 0.2)
    assert float(info_nce(q, k, negatives, temperature=0.2)) == pytest.approx(expected, rel=1e-6)


def test_queue_is_fifo() -> None:
    queue = FeatureQueue(5, 2)
    first = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    queue.push(first)
    assert torch.allclose(queue.queue[:3], F.normalize(first, dim=1)) and int(queue.pointer) == 3
    second = torch.tensor([[0.0, -1.0], [-1.0, 0.0], [1.0, 1.0]])
    queue.push(second)  # wraps around: rows 3, 4, 0
    assert torch.allclose(queue.queue[[3, 4, 0]], F.normalize(second, dim=1)) and int(queue.pointer) == 1
    assert torch.allclose(queue.queue[1:3], F.normalize(first[1:], dim=1))


# ----------------------------------------------------------------------------- dense correspondence


def _source_coordinates(box: list[float], flip: bool, size: int) -> torch.Tensor:
    """[2, size, size] source-image (x, y) fractions seen by each pixel of a crop (independent
    of the code under test: per-pixel loops)."""
    x0, y0, x1, y1 = box
    out = torch.zeros(2, size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            u = (j + 0.5) / size
            if flip:
                u = 1 - u
            out[0, i, j] = x0 + u * (x1 - x0)
            out[1, i, j] = y0 + (i + 0.5) / size * (y1 - y0)
    return out


def test_view_correspondence_maps_cells_to_the_same_image_point() -> None:
    boxes_a = torch.tensor([[0.1, 0.2, 0.7, 0.8], [0.0, 0.0, 0.5, 0.5]])
    boxes_b = torch.tensor([[0.3, 0.1, 0.9, 0.9], [0.2, 0.1, 0.9, 0.6]])
    flips_a = torch.tensor([False, True])
    flips_b = torch.tensor([True, False])
    grid, valid = view_correspondence(boxes_a, flips_a, boxes_b, flips_b, 4, 4)
    assert grid.shape == (2, 16, 2) and valid.shape == (2, 16)
    for b in range(2):
        seen_by_b = _source_coordinates(boxes_b[b].tolist(), bool(flips_b[b]), 64)[None]  # a fine "key map"
        sampled = sample_at(seen_by_b.float(), grid[b:b + 1])[0]  # [16, 2]
        expected = _source_coordinates(boxes_a[b].tolist(), bool(flips_a[b]), 4).flatten(1).t()  # [16, 2]
        x0, y0, x1, y1 = boxes_b[b].tolist()
        inside = (expected[:, 0] >= x0) & (expected[:, 0] <= x1) & (expected[:, 1] >= y0) & (expected[:, 1] <= y1)
        assert torch.equal(valid[b], inside)
        assert torch.allclose(sampled[inside].double(), expected[inside], atol=2e-2)
        assert inside.any() and not inside.all()


def test_dense_info_nce_uses_matched_keys() -> None:
    torch.manual_seed(3)
    queries = torch.randn(2, 8, 3, 3)
    grid, valid = view_correspondence(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([False, False]),
                                      torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([False, True]), 3, 3)
    # identical boxes: view B's key map is view A's, mirrored for the second image
    keys = torch.stack([queries[0], queries[1].flip(-1)])
    loss = dense_info_nce(queries, keys, grid, valid, negatives=None, temperature=0.2)
    q = queries.flatten(2).transpose(1, 2).reshape(-1, 8)
    assert float(loss) == pytest.approx(float(info_nce(q, q, None, 0.2)), rel=1e-5)
    none_valid = torch.zeros_like(valid)
    zero = dense_info_nce(queries.requires_grad_(), keys, grid, none_valid)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


# ----------------------------------------------------------------------------- rotation


def test_rotation_by_explicit_index_arithmetic() -> None:
    images = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    rotated = rotate_images(images, torch.tensor([0, 1]))
    assert torch.equal(rotated[0], images[0])
    size = 3
    for i in range(size):
        for j in range(size):  # 90 degrees counter-clockwise: out[i][j] = in[j][S - 1 - i]
            assert rotated[1, 0, i, j] == images[1, 0, j, size - 1 - i]
    twice = rotate_images(rotate_images(images, torch.tensor([1, 1])), torch.tensor([1, 1]))
    assert torch.equal(twice, rotate_images(images, torch.tensor([2, 2])))
    with pytest.raises(ValueError, match="square"):
        rotate_images(torch.zeros(1, 3, 4, 5), torch.tensor([1]))


def test_rotation_loss_is_cross_entropy_on_pooled_features() -> None:
    torch.manual_seed(4)
    head = RotationHead(6)
    features = torch.randn(5, 6)
    ids = torch.tensor([0, 1, 2, 3, 1])
    loss, accuracy = rotation_loss(head, features, ids)
    logits = head(features).tolist()
    expected = sum(-_log_softmax(logits[i])[int(ids[i])] for i in range(5)) / 5
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    correct = sum(max(range(4), key=lambda c: logits[i][c]) == int(ids[i]) for i in range(5))
    assert float(accuracy) == pytest.approx(correct / 5)
