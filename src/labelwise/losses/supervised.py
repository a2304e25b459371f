"""Supervised segmentation losses: cross-entropy, soft Dice, focal, Lovász-softmax, their
weighted sum, and deep supervision for models with side outputs (U²-Net).

Conventions: ``logits`` are ``[B, C, H, W]`` (any float dtype; every loss is computed in
float32, also under bf16 autocast), ``target`` is int64 ``[B, H, W]`` holding class ids in
``[0, C)`` or ``ignore_index`` for unlabeled pixels. Ignored pixels never contribute to a loss
or to its gradient. Every loss returns a scalar that stays connected to ``logits`` (a zero when
every pixel is ignored, never NaN), so ``loss.backward()`` is always safe.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import ConfigError

__all__ = [
    "cross_entropy",
    "soft_dice_loss",
    "focal_loss",
    "lovasz_softmax_loss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "LovaszLoss",
    "WeightedSumLoss",
    "deep_supervision_loss",
    "build_loss",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _check_inputs(logits: Tensor, target: Tensor, num_classes: int | None = None) -> None:
    """Raise ValueError unless logits is ``[B, C, H, W]`` float and target ``[B, H, W]`` integer."""
    if logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor [B, C, H, W]; got {tuple(logits.shape)} {logits.dtype}")
    if target.dim() != 3 or target.is_floating_point():
        raise ValueError(f"target must be an integer tensor [B, H, W]; got {tuple(target.shape)} {target.dtype}")
    b, c, h, w = logits.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}: "
            f"expected [B, H, W] = {(b, h, w)} (resize logits to the mask size first)"
        )
    if num_classes is not None and c != num_classes:
        raise ValueError(f"logits have {c} channels but the loss was built for {num_classes} classes")


def _weights_for(class_weights: Tensor | None, logits: Tensor) -> Tensor | None:
    """``class_weights`` as float32 ``[C]`` on the device of ``logits`` (or None)."""
    if class_weights is None:
        return None
    weights = class_weights.to(device=logits.device, dtype=torch.float32)
    if weights.shape != (logits.shape[1],):
        raise ValueError(f"class_weights must have shape [{logits.shape[1]}]; got {tuple(weights.shape)}")
    return weights


def _zero_like_loss(logits: Tensor) -> Tensor:
    """A float32 scalar zero whose graph reaches ``logits`` (zero gradient, never NaN)."""
    return logits.float().sum() * 0.0


def _autocast_off(logits: Tensor) -> torch.autocast:
    return torch.autocast(device_type=logits.device.type, enabled=False)


# --------------------------------------------------------------------------------------------
# functional losses
# --------------------------------------------------------------------------------------------
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Pixel-wise cross-entropy, float32, averaged like ``torch.nn.functional.cross_entropy``.

    Args:
        logits: ``[B, C, H, W]`` raw scores.
        target: int64 ``[B, H, W]`` class ids, ``ignore_index`` for unlabeled pixels.
        class_weights: optional ``[C]``; the mean is then taken over the summed weight of the
            non-ignored pixels (torch's ``reduction="mean"`` semantics).
        label_smoothing: in ``[0, 1)``, as in torch.

    Returns:
        Scalar float32 loss; exactly 0 (with a grad_fn reaching ``logits``) when every pixel
        is ignored.
    """
    _check_inputs(logits, target)
    valid = target != ignore_index
    if not bool(valid.any()):
        return _zero_like_loss(logits)
    with _autocast_off(logits):
        return F.cross_entropy(
            logits.float(),
            target.long(),
            weight=_weights_for(class_weights, logits),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )


def soft_dice_loss(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    smooth: float = 1.0,
    class_weights: Tensor | None = None,
    classes_present_only: bool = False,
) -> Tensor:
    """Multi-class soft Dice loss on softmax probabilities.

    For each class c, with ``p`` the softmax probabilities and ``g`` the one-hot target, both
    zeroed at ignored pixels, and sums taken over the whole batch (B, H and W together)::

        dice_c = (2 * sum(p_c * g_c) + smooth) / (sum(p_c) + sum(g_c) + smooth)
        loss   = weighted mean over classes of (1 - dice_c)

    Args:
        logits: ``[B, C, H, W]`` raw scores.
        target: int64 ``[B, H, W]``; ``ignore_index`` pixels are excluded from the
            intersection and from both sums.
        smooth: additive smoothing (>= 0). A class absent from both prediction and target has
            dice 1 (loss 0) whatever ``smooth`` is.
        class_weights: optional ``[C]`` weights of the class average (default: uniform).
        classes_present_only: average only over classes that occur in the (non-ignored)
            target of the batch; if none occurs the loss is 0.

    Returns:
        Scalar float32 loss in [0, 1].
    """
    _check_inputs(logits, target)
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0; got {smooth}")
    num_classes = logits.shape[1]
    with _autocast_off(logits):
        valid = (target != ignore_index).unsqueeze(1)  # [B, 1, H, W]
        probs = torch.softmax(logits.float(), dim=1) * valid
        safe_target = torch.where(valid.squeeze(1), target, torch.zeros_like(target)).long()
        onehot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2).float() * valid
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)  # [C]
        target_sum = onehot.sum(dims)
        denominator = probs.sum(dims) + target_sum + smooth
        dice = torch.where(
            denominator > 0,
            (2.0 * intersection + smooth) / denominator.clamp_min(1e-12),
            torch.ones_like(denominator),
        )
        per_class = 1.0 - dice  # [C]
        weights = _weights_for(class_weights, logits)
        weights = torch.ones_like(per_class) if weights is None else weights
        if classes_present_only:
            weights = weights * (target_sum > 0)
        total_weight = weights.sum()
        # the clamp keeps the all-absent case (total weight 0) at 0 instead of NaN
        return (per_class * weights).sum() / total_weight.clamp_min(1e-12)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    gamma: float = 2.0,
    class_weights: Tensor | None = None,
) -> Tensor:
    """Focal loss ``-(1 - p_t)^gamma * log(p_t)`` per pixel (Lin et al. 2017), float32.

    Averaged like :func:`cross_entropy`: over the non-ignored pixels, or over their summed
    class weight when ``class_weights`` (``[C]``) is given. ``gamma = 0`` is cross-entropy.
    Returns a scalar; 0 (connected to ``logits``) when every pixel is ignored.
    """
    _check_inputs(logits, target)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}")
    valid = target != ignore_index
    if not bool(valid.any()):
        return _zero_like_loss(logits)
    with _autocast_off(logits):
        log_probs = torch.log_softmax(logits.float(), dim=1)
        safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
        log_pt = log_probs.gather(1, safe_target.unsqueeze(1)).squeeze(1)  # [B, H, W]
        per_pixel = -((1.0 - log_pt.exp()) ** gamma) * log_pt
        weights = _weights_for(class_weights, logits)
        pixel_weight = valid.float() if weights is None else weights[safe_target] * valid
        return (per_pixel * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)


def lovasz_softmax_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, classes: str = "present") -> Tensor:
    """Lovász-softmax loss (Berman et al., CVPR 2018): a convex surrogate of ``1 - IoU`` per class.

    Over the non-ignored pixels of the whole batch, for each class ``c`` with errors
    ``e_i = |[target_i == c] - p_c(i)|`` sorted in decreasing order, the loss is the Lovász
    extension of the Jaccard loss, ``sum_i e_(i) * (J(S_i) - J(S_{i-1}))`` with ``S_i`` the
    ``i`` largest errors and ``J(S) = 1 - |G \\ S| / |G ∪ S|`` (``G``: the class's pixels). On
    one-hot probabilities it equals ``1 - IoU_c`` of the hard prediction exactly. Classes are
    averaged: ``classes="present"`` over classes present in the target (0 when none is),
    ``"all"`` over every class. Vectorised over classes (one sort of ``[C, P]``).

    Args:
        logits: ``[B, C, H, W]`` raw scores. target: int64 ``[B, H, W]``.

    Returns:
        Scalar float32 loss in [0, 1].
    """
    _check_inputs(logits, target)
    if classes not in ("present", "all"):
        raise ValueError(f"classes must be 'present' or 'all'; got {classes!r}")
    num_classes = logits.shape[1]
    valid = target != ignore_index
    if not bool(valid.any()):
        return _zero_like_loss(logits)
    with _autocast_off(logits):
        probs = torch.softmax(logits.float(), dim=1).permute(1, 0, 2, 3)[:, valid]  # [C, P]
        labels = target[valid].long()  # [P]
        foreground = (labels[None, :] == torch.arange(num_classes, device=labels.device)[:, None]).float()
        errors = (foreground - probs).abs()
        errors_sorted, order = torch.sort(errors, dim=1, descending=True)
        fg_sorted = torch.gather(foreground, 1, order)
        totals = fg_sorted.sum(1, keepdim=True)  # |G| per class
        intersection = totals - fg_sorted.cumsum(1)
        union = totals + (1.0 - fg_sorted).cumsum(1)
        jaccard = 1.0 - intersection / union  # J(S_i), i = 1..P; union >= 1 everywhere
        steps = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
        per_class = (errors_sorted * steps).sum(1)  # [C]
        if classes == "all":
            return per_class.mean()
        present = totals.squeeze(1) > 0
        return (per_class * present).sum() / present.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------
class _ClassWeightedLoss(nn.Module):
    """Holds ``ignore_index``, optional ``class_weights`` (non-persistent buffer) and an
    optional ``num_classes`` checked against the logits at every call."""

    class_weights: Tensor | None

    def __init__(self, ignore_index: int, class_weights: Tensor | None, num_classes: int | None) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.num_classes = num_classes
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def _check(self, logits: Tensor, target: Tensor) -> None:
        _check_inputs(logits, target, self.num_classes)


class CrossEntropyLoss(_ClassWeightedLoss):
    """Module form of :func:`cross_entropy`; ``forward(logits [B,C,H,W], target [B,H,W]) -> scalar``."""

    def __init__(
        self,
        ignore_index: int = 255,
        class_weights: Tensor | None = None,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(ignore_index, class_weights, num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1); got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return cross_entropy(logits, target, self.ignore_index, self.class_weights, self.label_smoothing)


class DiceLoss(_ClassWeightedLoss):
    """Module form of :func:`soft_dice_loss`; ``forward(logits [B,C,H,W], target [B,H,W]) -> scalar``."""

    def __init__(
        self,
        ignore_index: int = 255,
        smooth: float = 1.0,
        class_weights: Tensor | None = None,
        classes_present_only: bool = False,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(ignore_index, class_weights, num_classes)
        if smooth < 0:
            raise ConfigError(f"smooth must be >= 0; got {smooth}")
        self.smooth = float(smooth)
        self.classes_present_only = bool(classes_present_only)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return soft_dice_loss(
            logits, target, self.ignore_index, self.smooth, self.class_weights, self.classes_present_only
        )


class FocalLoss(_ClassWeightedLoss):
    """Module form of :func:`focal_loss`; ``forward(logits [B,C,H,W], target [B,H,W]) -> scalar``."""

    def __init__(
        self,
        ignore_index: int = 255,
        gamma: float = 2.0,
        class_weights: Tensor | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(ignore_index, class_weights, num_classes)
        if gamma < 0:
            raise ConfigError(f"gamma must be >= 0; got {gamma}")
        self.gamma = float(gamma)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return focal_loss(logits, target, self.ignore_index, self.gamma, self.class_weights)


class LovaszLoss(_ClassWeightedLoss):
    """Module form of :func:`lovasz_softmax_loss`; ``forward(logits [B,C,H,W], target [B,H,W]) -> scalar``."""

    def __init__(self, ignore_index: int = 255, classes: str = "present", num_classes: int | None = None) -> None:
        super().__init__(ignore_index, None, num_classes)
        if classes not in ("present", "all"):
            raise ConfigError(f"classes must be 'present' or 'all'; got {classes!r}")
        self.classes = classes

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return lovasz_softmax_loss(logits, target, self.ignore_index, self.classes)


# --------------------------------------------------------------------------------------------
# deep supervision and weighted sums
# --------------------------------------------------------------------------------------------
def deep_supervision_loss(loss: LossFn, output: Any, target: Tensor) -> Tensor:
    """Apply ``loss`` to a model output, summing over side outputs when there are any.

    ``output`` is either a logits tensor ``[B, C, H, W]`` (result: ``loss(output, target)``) or
    an object with ``.logits`` (the fused map) and ``.side_logits`` (a sequence of side maps,
    each ``[B, C, H, W]`` at the target resolution), as U²-Net returns in training. Then the
    result is, as in U²-Net, the unweighted sum

        loss(fused) + sum_i loss(side_i)

    i.e. every map, fused and side, has weight 1 (U²-Net with 6 sides: 7 terms).
    """
    if isinstance(output, Tensor):
        return loss(output, target)
    if hasattr(output, "logits") and hasattr(output, "side_logits"):
        total = loss(output.logits, target)
        for side in output.side_logits:
            total = total + loss(side, target)
        return total
    raise TypeError(
        "model output must be a logits tensor or have .logits and .side_logits; "
        f"got {type(output).__name__}"
    )


class WeightedSumLoss(nn.Module):
    """``total = sum_i weight_i * term_i(output, target)``.

    Args:
        terms: ``(name, weight, module)`` triples; names must be unique.

    ``forward(output, target)`` accepts a logits tensor ``[B, C, H, W]`` or a deep-supervision
    output (``.logits`` + ``.side_logits``, see :func:`deep_supervision_loss`), each term then
    being summed over all maps. Returns ``(total, parts)`` where ``total`` is the scalar to
    back-propagate and ``parts[name]`` the *unweighted*, detached value of each term (for
    logging), so ``total == sum(weight[name] * parts[name])``.
    """

    def __init__(self, terms: list[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ConfigError("loss: at least one loss term is required")
        names = [name for name, _, _ in terms]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"loss: duplicate term name(s) {duplicates}")
        self.weights: dict[str, float] = {name: float(weight) for name, weight, _ in terms}
        self.terms = nn.ModuleDict({name: module for name, _, module in terms})

    def forward(self, output: Any, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for name, module in self.terms.items():
            value = deep_supervision_loss(module, output, target)
            parts[name] = value.detach()
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        assert total is not None
        return total, parts


# --------------------------------------------------------------------------------------------
# builder
# --------------------------------------------------------------------------------------------
# name -> (module class, {config key: constructor keyword}, uses class weights)
_TERM_OPTIONS: dict[str, tuple[type[nn.Module], dict[str, str], bool]] = {
    "ce": (CrossEntropyLoss, {"label_smoothing": "label_smoothing"}, True),
    "dice": (DiceLoss, {"smooth": "smooth", "classes_present_only": "classes_present_only"}, False),
    "focal": (FocalLoss, {"gamma": "gamma"}, True),
    "lovasz": (LovaszLoss, {"classes": "classes"}, False),
}


def _build_term(
    index: int, spec: dict[str, Any], num_classes: int, ignore_index: int, class_weights: Tensor | None
) -> tuple[str, float, nn.Module]:
    where = f"loss term {index}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping like {{'name': 'ce', 'weight': 1.0}}; got {spec!r}")
    if "name" not in spec:
        raise ConfigError(f"{where}: missing key 'name' (one of {sorted(_TERM_OPTIONS)})")
    name = spec["name"]
    if name not in _TERM_OPTIONS:
        raise ConfigError(f"{where}: unknown loss name {name!r}; expected one of {sorted(_TERM_OPTIONS)}")
    cls, options, weighted = _TERM_OPTIONS[name]
    allowed = {"name", "weight", *options}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{where} ({name!r}): unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"{where} ({name!r}): key 'weight' must be a finite number >= 0; got {weight!r}")
    kwargs = {options[key]: value for key, value in spec.items() if key in options}
    if weighted:
        kwargs["class_weights"] = class_weights
    try:
        module = cls(ignore_index=ignore_index, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} ({name!r}): {exc}") from exc
    return name, float(weight), module


def build_loss(
    terms: list[dict[str, Any]],
    num_classes: int,
    ignore_index: int = 255,
    class_weights: Tensor | None = None,
) -> WeightedSumLoss:
    """Build a :class:`WeightedSumLoss` from a config list.

    Example: ``build_loss([{"name": "ce", "weight": 1.0}, {"name": "dice", "weight": 0.5}], 6)``.

    Term names and their extra keys: ``"ce"`` (``label_smoothing``), ``"dice"`` (``smooth``,
    ``classes_present_only``), ``"focal"`` (``gamma``), ``"lovasz"`` (``classes``); every term
    takes ``weight`` (default 1). ``class_weights`` (``[num_classes]``) apply to ``ce`` and
    ``focal``; Dice and Lovász are already means over classes and take none from here. Each name may appear once.

    Raises:
        ConfigError: an unknown name or key (the message names it), a bad weight or option,
            or ``class_weights`` of the wrong shape.
    """
    if num_classes < 1:
        raise ConfigError(f"loss: num_classes must be >= 1; got {num_classes}")
    if class_weights is not None:
        class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if class_weights.shape != (num_classes,):
            raise ConfigError(
                f"loss: class_weights must have shape [{num_classes}]; got {tuple(class_weights.shape)}"
            )
    if not isinstance(terms, (list, tuple)) or not terms:
        raise ConfigError(f"loss: expected a non-empty list of terms; got {terms!r}")
    built = [_build_term(i, spec, num_classes, ignore_index, class_weights) for i, spec in enumerate(terms)]
    return WeightedSumLoss(built)
