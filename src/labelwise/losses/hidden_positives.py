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
* ``specific_positives="agreeing"`` replaces ``S`` by ``S AND A``: a task-specific positive
  counts only where the backbone also calls the pair positive, so ``lambda`` re-weights the
  backbone's positives by the head's agreement and never adds pairs the backbone rejects
  (labelwise's guard for weak backbones; ``"all"`` is the paper).
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
``precision="bf16"`` runs every product in bfloat16 (float32 accumulation, bfloat16 results):
borderline pairs of the hard positive thresholds may flip. ``"mixed"`` runs the selection
products ``f.f`` and ``m.m`` in bfloat16 too, but recomputes in float32 every pair whose
similarity lies within the product's worst-case error (:func:`bf16_product_error_bound`) of its
threshold, so it selects the float32 positives; the pool criteria stay float32 and the
contrastive logits and gradients are bfloat16 products. ``"fp32"`` keeps everything in float32.
In bfloat16 modes ``lambda`` is rounded to a multiple of 2^-7 (see :func:`_product_lambda`).
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


#: Task-specific positive rules: the paper's, or only those the backbone agrees with.
SPECIFIC_POSITIVES = ("all", "agreeing")


@dataclass
class HiddenPositiveLossConfig:
    """Loss hyper-parameters (paper defaults; ``tau`` 0.4-0.8 by dataset).

    temperature: ``tau`` of the similarities; base_temperature: the loss is scaled by
    ``tau / base_temperature``; rho: fraction of non-positive patches in each denominator;
    chunk_elements: anchors per chunk times ``N`` stays below this (memory knob, no effect on
    the value); precision: ``bf16``, ``mixed`` or ``fp32`` products (module docstring);
    specific_positives: ``all`` (the paper's ``S``) or ``agreeing`` (``S AND A``, module docstring).
    """

    temperature: float = 0.8
    base_temperature: float = 0.07
    rho: float = 0.02
    chunk_elements: int = 1 << 24
    precision: str = "mixed"
    specific_positives: str = "all"

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
        if self.specific_positives not in SPECIFIC_POSITIVES:
            raise ConfigError(f"specific_positives: must be one of {list(SPECIFIC_POSITIVES)}, "
                              f"got {self.specific_positives!r}")


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


#: unit roundoff of bfloat16 (8 significant bits) and float32 (24)
_BF16_ROUNDOFF = 2.0 ** -8
_FP32_ROUNDOFF = 2.0 ** -24


def bf16_product_error_bound(depth: int, max_norm_a: float, max_norm_b: float) -> float:
    """Upper bound on ``|a . b - p|`` for ``p`` one entry of a bfloat16 product: both inputs
    rounded to bfloat16 (relative ``u = 2^-8`` each), float32 accumulation over ``depth`` terms
    (``depth * 2^-24`` relative, doubled as a margin) and the result rounded to bfloat16
    (``u``), for rows of norm at most ``max_norm_a`` / ``max_norm_b``."""
    u = _BF16_ROUNDOFF
    return (3 * u + 3 * u * u + 2 * depth * _FP32_ROUNDOFF) * max_norm_a * max_norm_b


class _Workspace:
    """``[chunk, N]`` buffers reused by every chunk of one loss evaluation: a fresh 40 MB tensor
    per element-wise step costs more in page faults than the step itself on a CPU."""

    def __init__(self, rows: int, n: int, product_dtype: torch.dtype, device: torch.device) -> None:
        self.n = n
        # float32: similarity - criterion, the criteria; float32 copies for reductions (mixed-dtype
        # element-wise ops and dtype= reductions convert through a hidden temporary: slower)
        self.difference = torch.empty(rows * n, device=device)
        self.criterion = torch.empty(rows * n, device=device)
        self.similarity = torch.empty(rows * n, dtype=product_dtype, device=device)
        self.masks = torch.empty(3, rows * n, dtype=torch.bool, device=device)  # A, S, scratch
        # [2C, N]: w_ij on top, exp(s_ij) below, so [w; exp] @ z and [w; exp]^T @ [.; .] are one product each
        self.stack = torch.empty(2 * rows * n, dtype=product_dtype, device=device)
        self._gather: Tensor | None = None

    gather_rows = 1 << 14

    def gather(self, which: int, pairs: int, dim: int) -> Tensor:
        """``[pairs, dim]`` float32 buffer ``which`` (0 or 1) for the exact recomputation of band pairs."""
        size = self.gather_rows * dim
        if self._gather is None or self._gather.shape[1] < size:
            self._gather = self.difference.new_empty(2, size)
        return self._gather[which, :pairs * dim].view(pairs, dim)

    def view(self, buffer: Tensor, rows: int) -> Tensor:
        return buffer[:rows * self.n].view(rows, self.n)

    def stacked(self, rows: int) -> Tensor:
        return self.stack[:2 * rows * self.n].view(2 * rows, self.n)


def _fill_positive_mask(out: Tensor, rows: Tensor, rows_p: Tensor, all_t_p: Tensor, vectors: Tensor,
                        criterion_rows: Tensor, criterion_all: Tensor, row_offset: int, tolerance: float,
                        workspace: _Workspace) -> None:
    """``out[i, j] = x_i . x_j > min(c_i, c_j)`` (False at ``j = i``) for a chunk of anchors.

    The similarities come from one product of ``rows_p [C, D]`` and ``all_t_p [D, N]`` (float32
    or bfloat16). With ``tolerance > 0`` (a bound on that product's error), every pair whose
    approximate similarity lies within ``tolerance`` of its criterion is recomputed in float32
    from ``rows`` / ``vectors``, so the mask equals the float32 one while the product runs in
    bfloat16: the pairs that decide are few, and only they pay for float32.
    """
    c = rows.shape[0]
    similarity = torch.mm(rows_p, all_t_p, out=workspace.view(workspace.similarity, c))
    difference = workspace.view(workspace.difference, c)
    difference.copy_(similarity)
    difference.sub_(torch.minimum(criterion_rows[:, None], criterion_all[None, :],
                                  out=workspace.view(workspace.criterion, c)))
    torch.gt(difference, 0.0, out=out)
    if tolerance > 0:
        band = torch.le(difference.abs_(), tolerance, out=workspace.view(workspace.masks[2], c))
        i, j = band.nonzero(as_tuple=True)
        block = workspace.gather_rows
        for first in range(0, i.numel(), block):  # bounded [pairs, D] gathers into reused buffers
            bi, bj = i[first:first + block], j[first:first + block]
            left = torch.index_select(rows, 0, bi, out=workspace.gather(0, bi.numel(), rows.shape[1]))
            right = torch.index_select(vectors, 0, bj, out=workspace.gather(1, bj.numel(), rows.shape[1]))
            exact = torch.linalg.vecdot(left, right)
            out[bi, bj] = exact > torch.minimum(criterion_rows[bi], criterion_all[bj])
    index = torch.arange(c, device=out.device)
    out[index, index + row_offset] = False


@dataclass
class _Selection:
    """Everything about a chunk's anchors that does not depend on ``z``."""

    start: int
    stack: Tensor  # [2C, N] product dtype: w_ij = A_ij + lambda S_ij on top, room for exp(s_ij) below
    denominator: Tensor | None  # bool [C, N]; None: every j != i
    total_weight: Tensor  # [C] W_i
    coefficient: Tensor  # [C] d total / d l_i (0 for dropped anchors)


@dataclass
class _Operands:
    """Per-call copies of the selection inputs in the layouts the chunk products read."""

    f: Tensor
    m: Tensor
    f_p: Tensor  # [N, D] product dtype
    m_p: Tensor
    f_t_p: Tensor  # [D, N] product dtype, contiguous
    m_t_p: Tensor
    c_ag: Tensor
    c_sp: Tensor
    tolerance_ag: float
    tolerance_sp: float


def _contrastive_term(codes: Tensor, codes_p: Tensor, rows: slice, selection: _Selection, tau: float,
                      grad: Tensor | None, workspace: _Workspace) -> Tensor:
    """``sum_i coef_i * l_i`` over the chunk's anchors; adds its gradient w.r.t. ``codes`` into ``grad``.

    Few element-wise passes over ``[C, N]`` (memory-bound on a CPU), everything else matrix
    products: ``exp(s_ij)`` is written below ``w`` in the selection's stack, so the positive sums
    ``sum_j w_ij z_j`` and ``sum_j exp_ij z_j`` are one product and the backward terms
    ``sum_i (u_i w_ij - v_i exp_ij) z_i`` (``dl_i/ds_ij = w_ij / W_i - p_ij``) another.
    ``codes_p``: ``codes`` in the product dtype.
    """
    dtype = codes_p.dtype
    anchors = codes[rows]
    c = anchors.shape[0]
    stack = selection.stack
    exp = stack[c:]
    # |s| <= 1/tau for unit vectors; exp(s) needs no shift below 1/tau = 30 (the sums stay far
    # from overflow), and skipping it keeps the bfloat16 exponent error at that of s itself
    shift = 1.0 / tau if tau < 1.0 / 30 else 0.0
    torch.mm((anchors / tau).to(dtype), codes_p.T, out=exp)
    if shift:
        exp.sub_(shift)
    exp.exp_()
    index = torch.arange(c, device=exp.device)
    if selection.denominator is None:
        exp[index, index + selection.start] = 0.0
    else:
        exp.mul_(selection.denominator)
    if exp.dtype == torch.float32:
        partition = exp.sum(1)
    else:
        partition = workspace.view(workspace.difference, c).copy_(exp).sum(1)
    partition.clamp_min_(torch.finfo(torch.float32).tiny)
    sums = torch.mm(stack, codes_p).float()  # [2C, E]: sum_j w_ij z_j; sum_j exp_ij z_j
    positive_sum, exp_sum = sums[:c], sums[c:]
    weight = selection.total_weight.clamp_min(1e-12)
    numerator = (anchors * positive_sum).sum(1) / tau
    mean_log_prob = numerator / weight - (shift + torch.log(partition))
    value = (selection.coefficient * mean_log_prob).sum()
    if grad is not None:
        u = (selection.coefficient / weight)[:, None]
        v = (selection.coefficient / partition)[:, None]
        grad[rows] += (u * positive_sum - v * exp_sum) / tau
        back = torch.mm(stack.T, torch.cat([u * anchors, -v * anchors]).to(dtype))  # [N, E]
        grad.add_(back, alpha=1.0 / tau)
    return value


def _select(ops: _Operands, rows: slice, lam: float, rho: float, patches_per_image: int, num_images: int,
            scale: float, generator: torch.Generator | None, workspace: _Workspace, agreeing: bool = False
            ) -> tuple[_Selection, dict[str, float]]:
    start = rows.start
    c = rows.stop - rows.start
    pos_ag = workspace.view(workspace.masks[0], c)
    pos_sp = workspace.view(workspace.masks[1], c)
    _fill_positive_mask(pos_ag, ops.f[rows], ops.f_p[rows], ops.f_t_p, ops.f, ops.c_ag[rows], ops.c_ag, start,
                        ops.tolerance_ag, workspace)
    _fill_positive_mask(pos_sp, ops.m[rows], ops.m_p[rows], ops.m_t_p, ops.m, ops.c_sp[rows], ops.c_sp, start,
                        ops.tolerance_sp, workspace)
    if agreeing:
        pos_sp &= pos_ag
    denominator: Tensor | None = None
    if rho < 1:
        denominator = workspace.view(workspace.masks[2], c)
        if rho > 0:
            noise = workspace.view(workspace.difference, c)
            noise.uniform_(generator=generator)
            torch.lt(noise, rho, out=denominator)
            denominator |= pos_ag
            index = torch.arange(c, device=pos_ag.device)
            denominator[index, index + start] = False
        else:
            denominator.copy_(pos_ag)
    stack = workspace.stacked(c)
    weights = stack[:c]
    scratch = workspace.view(workspace.difference, c)
    weights.copy_(pos_ag)  # bool -> product dtype: one conversion pass
    count_ag = scratch.copy_(weights).sum(1)
    sp = stack[c:].copy_(pos_sp)  # the lower half is free until the contrastive terms
    count_sp = scratch.copy_(sp).sum(1)
    if lam:
        weights.add_(sp, alpha=lam)  # lam is exact in the product dtype (see _product_lambda)
    total = count_ag + lam * count_sp
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
    selection = _Selection(start, stack, denominator, total, coefficient.reshape(-1))
    return selection, stats


def _product_lambda(lam: float, product_dtype: torch.dtype) -> float:
    """``lambda`` as used with weights stored in ``product_dtype``: in bfloat16 it is rounded to a
    multiple of 2^-7 (<= 0.4% of the schedule's step), so that ``lambda`` and ``1 + lambda`` are
    exact and ``W_i = |A_i| + lambda |S_i|`` is exactly the row sum of the stored weights (the
    gradient's ``sum_j w_ij / W_i = 1`` must hold for them)."""
    if product_dtype == torch.float32:
        return lam
    return round(lam * 128) / 128


def _operands(f: Tensor, m: Tensor, pool_ag: Tensor, pool_sp: Tensor, precision: str,
              product_dtype: torch.dtype) -> _Operands:
    select_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    c_ag = pool_criterion(f, pool_ag, bf16=precision == "bf16")
    c_sp = pool_criterion(m, pool_sp, bf16=precision == "bf16")
    f_p, m_p = f.to(select_dtype), m.to(select_dtype)
    tolerance_ag = tolerance_sp = 0.0
    if precision == "mixed":  # bf16 products, float32 decisions (see _fill_positive_mask)
        norm_f, norm_m = float(f.norm(dim=1).max()), float(m.norm(dim=1).max())
        tolerance_ag = bf16_product_error_bound(f.shape[1], norm_f, norm_f)
        tolerance_sp = bf16_product_error_bound(m.shape[1], norm_m, norm_m)
    return _Operands(f, m, f_p, m_p, f_p.T.contiguous(), m_p.T.contiguous(), c_ag, c_sp, tolerance_ag, tolerance_sp)


def _hidden_positive_value_and_grads(z: Tensor, z_mix: Tensor | None, f: Tensor, m: Tensor, pool_ag: Tensor,
                                     pool_sp: Tensor, lam: float, patches_per_image: int,
                                     config: HiddenPositiveLossConfig, generator: torch.Generator | None,
                                     need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None, dict[str, float]]:
    n = z.shape[0]
    if n % patches_per_image:
        raise ValueError(f"{n} patches is not a whole number of images of {patches_per_image} patches")
    num_images = n // patches_per_image
    product_dtype = torch.float32 if config.precision == "fp32" else torch.bfloat16
    lam = _product_lambda(lam, product_dtype)
    z = z.detach().float()
    z_mix = None if z_mix is None else z_mix.detach().float()
    ops = _operands(f.detach().float(), m.detach().float(), pool_ag.detach().float(), pool_sp.detach().float(),
                    config.precision, product_dtype)
    z_p = z.to(product_dtype)
    z_mix_p = None if z_mix is None else z_mix.to(product_dtype)
    grad_z = torch.zeros_like(z) if need_grad else None
    grad_mix = torch.zeros_like(z_mix) if need_grad and z_mix is not None else None
    images_per_chunk = min(num_images, max(1, config.chunk_elements // (patches_per_image * n)))
    workspace = _Workspace(images_per_chunk * patches_per_image, n, product_dtype, z.device)
    scale = config.temperature / config.base_temperature
    total = z.new_zeros(())
    stats = {"anchors_kept": 0.0, "positives_ag": 0.0, "positives_sp": 0.0}
    for first in range(0, num_images, images_per_chunk):
        last = min(num_images, first + images_per_chunk)
        rows = slice(first * patches_per_image, last * patches_per_image)
        selection, chunk_stats = _select(ops, rows, lam, config.rho, patches_per_image, num_images, scale,
                                         generator, workspace, config.specific_positives == "agreeing")
        total = total + _contrastive_term(z, z_p, rows, selection, config.temperature, grad_z, workspace)
        if z_mix is not None:
            total = total + _contrastive_term(z_mix, z_mix_p, rows, selection, config.temperature, grad_mix,
                                              workspace)
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
            :func:`labelwise.features.attention.local_positive_weights`.

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
