"""Hidden Positives (HP, CVPR 2023): the contrastive loss of unsupervised segmentation heads.

Notation (all per-patch vectors L2-normalised, ``N = B * P`` patches of ``B`` images with ``P``
patches each, rows image-major):

* ``f [N, D]``: frozen backbone features; ``m [N, E]``: momentum-head outputs; ``z [N, E']``:
  projected head outputs (trained); ``z_mix [N, E']``: projected attention-mixed codes (LHP).
* ``c_ag[i] = max_q f_i . q`` over the task-agnostic pool ``Q_ag`` (backbone features);
  ``c_sp[i] = max_q m_i . q`` over the task-specific pool ``Q_sp`` (momentum-head outputs).
* Global hidden positives: ``A_ij = [f_i . f_j > min(c_ag[i], c_ag[j])]`` (``> c_i`` or
  ``> c_j``: symmetric), ``S_ij`` the same with ``m`` and ``c_sp``; both exclude ``j = i``.
* Weights ``w_ij = A_ij + lambda * S_ij``, ``W_i = sum_j w_ij``. Denominator set
  ``D_i = {j != i : A_ij or R_ij}`` with ``R`` a random mask keeping each entry with probability
  ``rho`` (``rho >= 1``: every ``j != i``).
* ``s_ij = z_i . z_j / tau``; ``l_i = sum_j w_ij (s_ij - log sum_{k in D_i} exp s_ik) / W_i``.
* Anchors without a task-agnostic positive are dropped; anchor weights ``pnm_i = W_i /
  mean(W)`` over the kept anchors of the same image; per image the mean over kept anchors of
  ``-(tau / base_tau) * pnm_i * l_i``; LHP adds the same term with ``z_mix`` in place of ``z``
  (same ``w``, ``D``, ``pnm``). Total: sum over images of (GHP + LHP) / (2 B). This is the
  official ``SupConLoss`` (``loss_version 1``, reweighting on) evaluated image by image; an
  image whose anchors all lack positives contributes 0 (the reference code returns NaN).

Implementation: anchors are processed in chunks of whole images against the whole batch; for
each chunk the masks are built once and the value *and the gradient* with respect to ``z`` and
``z_mix`` are computed in closed form (``dl/ds_ij = coef_i (w_ij / W_i - p_ij)`` with ``p`` the
softmax over ``D_i``), so no ``[N, N]`` matrix and no autograd graph of the chunks is kept:
memory is a few ``[chunk, N]`` matrices whatever the batch. The gradient is handed to autograd
through a custom ``Function``, so ``z`` and ``z_mix`` may come from any differentiable head.
``precision="bf16"`` runs all similarity / gradient products in bfloat16 (float32 results and
float32 element-wise work); ``"mixed"`` keeps the products that *select* positives (``f.f``,
``m.m`` and the pool criteria, hard thresholds where a rounding flips a borderline pair) in
float32 and runs the contrastive logits and gradients in bfloat16; ``"fp32"`` keeps everything
in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import ConfigError

__all__ = [
    "HiddenPositiveLoss",
    "HiddenPositiveLossConfig",
    "hidden_positive_loss",
    "lambda_schedule",
    "mix_neighbourhood",
    "pool_criterion",
    "positive_mask",
]


@dataclass
class HiddenPositiveLossConfig:
    """Loss hyper-parameters (paper defaults; ``tau`` 0.4-0.8 by dataset).

    temperature: ``tau`` of the similarities; base_temperature: the loss is scaled by
    ``tau / base_temperature``; rho: fraction of non-positive patches in each denominator;
    chunk_elements: anchors per chunk times ``N`` stays below this (memory knob, no effect on
    the value); precision: ``bf16``, ``mixed`` or ``fp32`` products (module docstring).
    """

    temperature: float = 0.8
    base_temperature: float = 0.07
    rho: float = 0.02
    chunk_elements: int = 1 << 24
    precision: str = "mixed"

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if self.base_temperature <= 0:
            raise ConfigError(f"base_temperature: must be > 0, got {self.base_temperature}")
        if not 0 <= self.rho <= 1:
            raise ConfigError(f"rho: must be in [0, 1], got {self.rho}")
        if self.chunk_elements < 1:
            raise ConfigError(f"chunk_elements: must be >= 1, got {self.chunk_elements}")
        if self.precision not in ("bf16", "mixed", "fp32"):
            raise ConfigError(f"precision: must be 'bf16', 'mixed' or 'fp32', got {self.precision!r}")


def lambda_schedule(step: int, total_steps: int, warmup_steps: int) -> float:
    """Weight of the task-specific positives: 0 up to ``warmup_steps``, then linear to 1 at
    ``total_steps`` (the reference code's ``(step - warmup) / (total - warmup)``)."""
    if step <= warmup_steps or total_steps <= warmup_steps:
        return 0.0
    return min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))


def _mm(a: Tensor, b: Tensor, bf16: bool) -> Tensor:
    """``a @ b`` as float32, computed in bfloat16 when asked."""
    if bf16:
        return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16)).float()
    return torch.mm(a.float(), b.float())


@torch.no_grad()
def pool_criterion(features: Tensor, pool: Tensor, chunk_rows: int = 8192, bf16: bool = False) -> Tensor:
    """Anchor-dependent criterion ``c_i = max_q x_i . q``.

    Args:
        features: ``[N, D]`` L2-normalised vectors.
        pool: ``[Q, D]`` L2-normalised reference vectors.

    Returns:
        ``[N]`` float32.
    """
    out = features.new_empty(features.shape[0], dtype=torch.float32)
    pool_t = pool.T.contiguous()
    for start in range(0, features.shape[0], chunk_rows):
        out[start:start + chunk_rows] = _mm(features[start:start + chunk_rows], pool_t, bf16).amax(1)
    return out


def positive_mask(similarity: Tensor, criterion_rows: Tensor, criterion_all: Tensor, row_offset: int) -> Tensor:
    """Symmetric hidden positives of a chunk of anchors.

    Args:
        similarity: ``[C, N]`` cosine similarities of anchors ``row_offset .. row_offset + C``
            to all ``N`` patches.
        criterion_rows: ``[C]`` criterion of the anchors; criterion_all: ``[N]`` of all patches.

    Returns:
        bool ``[C, N]``: ``sim > c_i or sim > c_j``, False at ``j = i``.
    """
    mask = similarity > torch.minimum(criterion_rows[:, None], criterion_all[None, :])
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    mask[rows, rows + row_offset] = False
    return mask


@dataclass
class _Selection:
    """Everything about a chunk's anchors that does not depend on ``z``."""

    start: int
    weights: Tensor  # [C, N] w_ij = A_ij + lambda S_ij in the product dtype
    denominator: Tensor | None  # bool [C, N]; None: every j != i
    total_weight: Tensor  # [C] W_i
    coefficient: Tensor  # [C] d total / d l_i (0 for dropped anchors)


def _contrastive_term(codes: Tensor, codes_p: Tensor, rows: slice, selection: _Selection, tau: float,
                      grad: Tensor | None) -> Tensor:
    """``sum_i coef_i * l_i`` over the chunk's anchors; adds its gradient w.r.t. ``codes`` into ``grad``.

    Written so that the ``[C, N]`` matrices are touched by few element-wise passes (memory-bound
    on a CPU) and everything else is a matrix product (fast): the positive sums use
    ``sum_j w_ij s_ij = z_i . (w @ z)_i / tau`` and the gradient
    ``dl_i/ds_ij = w_ij / W_i - p_ij`` is applied as products with ``w`` and ``exp`` separately
    (five ``[C, N] x [N, E]`` products per term). ``codes_p``: ``codes`` in the product dtype.
    """
    dtype = codes_p.dtype
    anchors = codes[rows]
    # exp(s_ij - 1/tau) with s = z.z / tau: |s| <= 1/tau for unit vectors, so exp() <= 1 without a row max
    exp = torch.mm((anchors / tau).to(dtype), codes_p.T).float().sub_(1.0 / tau).exp_()  # [C, N]
    index = torch.arange(exp.shape[0], device=exp.device)
    if selection.denominator is None:
        exp[index, index + selection.start] = 0.0
    else:
        exp.mul_(selection.denominator)
    partition = exp.sum(1).clamp_min_(torch.finfo(torch.float32).tiny)
    positive_sum = torch.mm(selection.weights, codes_p).float()  # [C, E]: sum_j w_ij z_j
    weight = selection.total_weight.clamp_min(1e-12)
    numerator = (anchors * positive_sum).sum(1) / tau
    mean_log_prob = numerator / weight - (1.0 / tau + torch.log(partition))
    value = (selection.coefficient * mean_log_prob).sum()
    if grad is not None:
        u = (selection.coefficient / weight)[:, None]
        v = (selection.coefficient / partition)[:, None]
        exp_p = exp.to(dtype)
        grad[rows] += (u * positive_sum - v * torch.mm(exp_p, codes_p).float()) / tau
        back = torch.mm(selection.weights.T, (u * anchors).to(dtype)).float()
        back.sub_(torch.mm(exp_p.T, (v * anchors).to(dtype)).float())
        grad += back / tau
    return value


def _select(f: Tensor, m: Tensor, c_ag: Tensor, c_sp: Tensor, rows: slice, lam: float, rho: float,
            patches_per_image: int, num_images: int, scale: float, bf16: bool, product_dtype: torch.dtype,
            generator: torch.Generator | None) -> tuple[_Selection, dict[str, float]]:
    start = rows.start
    pos_ag = positive_mask(_mm(f[rows], f.T, bf16), c_ag[rows], c_ag, start)
    pos_sp = positive_mask(_mm(m[rows], m.T, bf16), c_sp[rows], c_sp, start)
    count_ag = pos_ag.sum(1).float()
    count_sp = pos_sp.sum(1).float()
    denominator: Tensor | None = None
    if rho < 1:
        denominator = pos_ag.clone()
        if rho > 0:
            noise = torch.rand(pos_ag.shape, generator=generator, device=f.device) if generator is not None \
                else torch.rand(pos_ag.shape, device=f.device)
            denominator |= noise < rho
            index = torch.arange(pos_ag.shape[0], device=f.device)
            denominator[index, index + start] = False
    weights = pos_ag.to(product_dtype)
    if lam:
        weights.add_(pos_sp.to(product_dtype), alpha=lam)
    # W_i from the weights as stored: in bfloat16, 1 + lambda is rounded (<= 0.4%), and the
    # gradient's sum_j w_ij / W_i = 1 must hold for the stored weights
    total = weights.sum(1, dtype=torch.float32) if product_dtype != torch.float32 else count_ag + lam * count_sp
    kept = count_ag > 0
    # per-image anchor weights normalised to mean 1 over the image's kept anchors
    per_image_total = total.view(-1, patches_per_image)
    per_image_kept = kept.view(-1, patches_per_image).float()
    kept_count = per_image_kept.sum(1, keepdim=True)
    mean_total = (per_image_total * per_image_kept).sum(1, keepdim=True) / kept_count.clamp_min(1)
    pnm = per_image_total / mean_total.clamp_min(1e-12)
    coefficient = -scale * pnm * per_image_kept / kept_count.clamp_min(1) / (2 * num_images)
    stats = {"anchors_kept": float(kept.sum()), "positives_ag": float(count_ag.sum()),
             "positives_sp": float(count_sp.sum())}
    selection = _Selection(start, weights, denominator, total, coefficient.reshape(-1))
    return selection, stats


def _hidden_positive_value_and_grads(z: Tensor, z_mix: Tensor | None, f: Tensor, m: Tensor, pool_ag: Tensor,
                                     pool_sp: Tensor, lam: float, patches_per_image: int,
                                     config: HiddenPositiveLossConfig, generator: torch.Generator | None,
                                     need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, float]]:
    n = z.shape[0]
    if n % patches_per_image:
        raise ValueError(f"{n} patches is not a whole number of images of {patches_per_image} patches")
    num_images = n // patches_per_image
    bf16 = config.precision in ("bf16", "mixed")
    select_bf16 = config.precision == "bf16"
    z = z.detach().float()
    z_mix = None if z_mix is None else z_mix.detach().float()
    f, m = f.detach().float(), m.detach().float()
    c_ag = pool_criterion(f, pool_ag.detach().float(), bf16=select_bf16)
    c_sp = pool_criterion(m, pool_sp.detach().float(), bf16=select_bf16)
    product_dtype = torch.bfloat16 if bf16 else torch.float32
    z_p = z.to(product_dtype)
    z_mix_p = None if z_mix is None else z_mix.to(product_dtype)
    grad_z = torch.zeros_like(z) if need_grad else None
    grad_mix = torch.zeros_like(z_mix) if need_grad and z_mix is not None else None
    images_per_chunk = max(1, config.chunk_elements // (patches_per_image * n))
    scale = config.temperature / config.base_temperature
    total = z.new_zeros(())
    stats = {"anchors_kept": 0.0, "positives_ag": 0.0, "positives_sp": 0.0}
    for first in range(0, num_images, images_per_chunk):
        last = min(num_images, first + images_per_chunk)
        rows = slice(first * patches_per_image, last * patches_per_image)
        selection, chunk_stats = _select(f, m, c_ag, c_sp, rows, lam, config.rho, patches_per_image,
                                         num_images, scale, select_bf16, product_dtype, generator)
        total = total + _contrastive_term(z, z_p, rows, selection, config.temperature, grad_z)
        if z_mix is not None:
            total = total + _contrastive_term(z_mix, z_mix_p, rows, selection, config.temperature, grad_mix)
        for key, value in chunk_stats.items():
            stats[key] += value
    stats = {"anchors_kept": stats["anchors_kept"] / n,
             "positives_ag": stats["positives_ag"] / n, "positives_sp": stats["positives_sp"] / n}
    return total, grad_z, grad_mix, stats


class _HiddenPositiveFunction(torch.autograd.Function):
    """Value in forward, the closed-form gradients (computed there too) in backward."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, z_mix: Tensor | None, payload: dict[str, Any]) -> Tensor:  # type: ignore[override]
        need_grad = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        arguments = {k: v for k, v in payload.items() if k != "stats_out"}
        value, grad_z, grad_mix, stats = _hidden_positive_value_and_grads(z, z_mix, need_grad=need_grad, **arguments)
        payload["stats_out"].update(stats)
        ctx.grads = (grad_z, grad_mix)
        ctx.dtypes = (z.dtype, None if z_mix is None else z_mix.dtype)
        return value.to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        grad_z, grad_mix = ctx.grads
        out_z = None if grad_z is None else (grad_z * grad_output).to(ctx.dtypes[0])
        out_mix = None if grad_mix is None else (grad_mix * grad_output).to(ctx.dtypes[1])
        return out_z, out_mix, None


def hidden_positive_loss(z: Tensor, features: Tensor, momentum: Tensor, pool_ag: Tensor, pool_sp: Tensor, *,
                         lam: float, patches_per_image: int, z_mix: Tensor | None = None,
                         config: HiddenPositiveLossConfig | None = None, generator: torch.Generator | None = None,
                         stats: dict[str, float] | None = None) -> Tensor:
    """The HP loss (module docstring) of one mini-batch.

    Args:
        z: ``[N, E]`` L2-normalised projections of the head outputs (gradient flows).
        features: ``[N, D]`` L2-normalised backbone features (no gradient).
        momentum: ``[N, E2]`` L2-normalised momentum-head outputs (no gradient).
        pool_ag: ``[Qa, D]`` / pool_sp: ``[Qs, E2]`` L2-normalised reference pools.
        lam: weight of the task-specific positives (:func:`lambda_schedule`).
        patches_per_image: ``P``; rows ``[b * P, (b + 1) * P)`` belong to image ``b``.
        z_mix: ``[N, E]`` projections of the attention-mixed codes (LHP term), or None.
        generator: draws the random denominator mask (``0 < rho < 1``).
        stats: filled with ``anchors_kept`` (fraction), ``positives_ag`` / ``positives_sp``
            (mean count per patch).

    Returns:
        Scalar loss.
    """
    config = config or HiddenPositiveLossConfig()
    config.validate()
    if z_mix is not None and z_mix.shape != z.shape:
        raise ValueError(f"z_mix shape {tuple(z_mix.shape)} differs from z {tuple(z.shape)}")
    for name, tensor in (("features", features), ("momentum", momentum)):
        if tensor.shape[0] != z.shape[0]:
            raise ValueError(f"{name} has {tensor.shape[0]} rows, z has {z.shape[0]}")
    payload = {"f": features, "m": momentum, "pool_ag": pool_ag, "pool_sp": pool_sp, "lam": float(lam),
               "patches_per_image": int(patches_per_image), "config": config, "generator": generator,
               "stats_out": stats if stats is not None else {}}
    return _HiddenPositiveFunction.apply(z, z_mix, payload)


def mix_neighbourhood(code: Tensor, weights: Tensor) -> Tensor:
    """Local hidden positives: the attention-weighted sum of each patch's 3x3 neighbours' codes
    divided by the number of neighbours inside the grid (4 at corners, 6 on edges, 9 inside).

    Args:
        code: ``[B, C, h, w]`` head outputs.
        weights: ``[B, 9, h, w]``; channel ``3 * (dy + 1) + (dx + 1)`` weights neighbour
            ``(y + dy, x + dx)`` (0 outside the grid), e.g.
            :func:`labelwise.engine.feature_attention.local_positive_weights`.

    Returns:
        ``[B, C, h, w]``; gradient reaches each neighbour in proportion to its weight.
    """
    b, c, h, w = code.shape
    if weights.shape != (b, 9, h, w):
        raise ValueError(f"weights must be [B, 9, h, w] = {[b, 9, h, w]}, got {list(weights.shape)}")
    padded = F.pad(code, (1, 1, 1, 1))
    mixed = torch.zeros_like(code)
    for channel in range(9):
        dy, dx = divmod(channel, 3)
        mixed = mixed + weights[:, channel:channel + 1] * padded[:, :, dy:dy + h, dx:dx + w]
    rows = 3 - (torch.arange(h, device=code.device) == 0).long() - (torch.arange(h, device=code.device) == h - 1).long()
    cols = 3 - (torch.arange(w, device=code.device) == 0).long() - (torch.arange(w, device=code.device) == w - 1).long()
    count = (rows[:, None] * cols[None, :]).to(code.dtype)
    return mixed / count


class HiddenPositiveLoss(nn.Module):
    """Module form of :func:`hidden_positive_loss` taking ``[B, C, h, w]`` maps.

    ``forward(z, features, momentum, pool_ag, pool_sp, lam, z_mix=None, generator=None)``:
    ``z`` / ``z_mix`` ``[B, E, h, w]`` L2-normalised along channels, ``features`` ``[B, D, h, w]``,
    ``momentum`` ``[B, E2, h, w]`` (normalised here), pools ``[Q, D]`` / ``[Q, E2]``
    (normalised). Returns the loss; ``self.last_stats`` holds the selection statistics.
    """

    def __init__(self, config: HiddenPositiveLossConfig | None = None) -> None:
        super().__init__()
        self.config = config or HiddenPositiveLossConfig()
        self.config.validate()
        self.last_stats: dict[str, float] = {}

    @staticmethod
    def _rows(x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def forward(self, z: Tensor, features: Tensor, momentum: Tensor, pool_ag: Tensor, pool_sp: Tensor, lam: float,
                z_mix: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        patches = z.shape[2] * z.shape[3]
        self.last_stats = {}
        return hidden_positive_loss(
            self._rows(z), F.normalize(self._rows(features.float()), dim=1),
            F.normalize(self._rows(momentum.float()), dim=1), pool_ag, pool_sp, lam=lam, patches_per_image=patches,
            z_mix=None if z_mix is None else self._rows(z_mix), config=self.config, generator=generator,
            stats=self.last_stats)
