"""One training step of FixMatch- and UniMatch-style consistency training.

Per step, with ``B`` labeled and ``B`` unlabeled images (:mod:`.data`):

1. both parts are resized to the stage's ``input_scale``; the labeled part gets the stage's
   augmentation (geometry and color), the unlabeled part the same geometry only: that is the
   weak view (UniMatch: resize, crop, flip);
2. one forward of the labeled images and the weak views (concatenated when their sizes match)
   gives the supervised loss (the configured loss terms) and the weak-view predictions; with
   ``unimatch`` the weak views' encoder features also go through the decoder with channel
   dropout (the feature-perturbation stream, computed in this forward only);
3. pseudo-labels: the argmax of the weak-view softmax (of the EMA teacher when there is one),
   ignored below ``threshold`` and outside the image (:func:`~.perturb.confident_pseudo_labels`);
   logged: ``confident`` (their share of the valid pixels) and ``pseudo_top_share`` (the share of
   the commonest class among them, near 1 when training collapses onto one class);
4. strong views: the weak views with UniMatch's color jitter / grayscale / blur, then CutMix
   with the next image of the batch (``roll`` by one: images, pseudo-labels and validity take
   the partner's values in the same box);
5. unlabeled losses are cross-entropies against the pseudo-labels, summed over confident pixels
   and divided by the number of valid pixels (UniMatch's normalisation, so that an
   unconfident image contributes little rather than being rescaled up).

``fixmatch``: ``L_sup + unsup_weight * L_s``. ``unimatch``: ``(L_sup + 0.25 L_s1 + 0.25 L_s2 +
0.5 L_fp) / 2``. Optional terms added to either: ``transform_consistency`` (predictions on a
flipped / 90-degree-rotated weak view against the same transform of the detached weak-view
softmax, soft cross-entropy on valid pixels) and ``rotation_weight`` (the S4L rotation task on
a square centre crop of the weak views, from the deepest encoder features).

Wide-context students (``wide_context`` given, images ``[B, 2C, H, W]``: windows then their
contexts, :mod:`labelwise.data.wide_context`): every augmentation moves a window and its context
together (:func:`~labelwise.data.wide_context.augment_with_context`; the strong view's colour
draws are replayed on the context), CutMix pastes the partner's pixels into the window only (the
context stays the image's own ground), and the labeled windows' auxiliary context loss joins the
supervised loss with WiCoNet's decaying weight.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.data.transforms import PairedAugment, scale_batch
from labelwise.data.wide_context import augment_with_context, scale_and_augment_with_context
from labelwise.engine.segmenter import context_loss_weight
from labelwise.engine.trainer import StepContext, StepOutput
from labelwise.losses import WeightedSumLoss
from labelwise.losses.rotation import random_rotations
from labelwise.methods.semi.config import SemiSettings
from labelwise.methods.semi.model import SemiModel, StudentOutputs, main_logits
from labelwise.methods.semi.perturb import confident_pseudo_labels, cutmix_boxes, feature_dropout, strong_photometric
from labelwise.models.wide_context import ContextOutput

__all__ = ["WideContextTraining", "make_consistency_step", "strong_views", "transform_views", "unlabeled_loss"]


class WideContextTraining(NamedTuple):
    """What a consistency step needs for a wide-context student: its ``context_scale``, the
    auxiliary loss weight (``loss.context_weight``) and the run's total steps (for its decay)."""

    context_scale: float
    weight: float
    total_steps: int


def strong_views(weak: Tensor, generator: torch.Generator, context_channels: int = 0) -> Tensor:
    """UniMatch's strong photometric view of ``weak [B, C, H, W]``; with ``context_channels`` the
    last that many channels are the windows' contexts and get the same draws as the windows."""
    if not context_channels:
        return strong_photometric(weak, generator)
    state = generator.get_state()
    windows = strong_photometric(weak[:, :-context_channels], generator)
    after = generator.get_state()
    generator.set_state(state)  # replay the windows' draws on their contexts
    contexts = strong_photometric(weak[:, -context_channels:], generator)
    generator.set_state(after)
    return torch.cat([windows, contexts], dim=1)


def unlabeled_loss(logits: Tensor, pseudo_labels: Tensor, valid: Tensor, ignore_index: int = 255) -> Tensor:
    """Cross-entropy of ``logits [B, K, H, W]`` against ``pseudo_labels [B, H, W]`` summed over the
    pixels that have a label, divided by the number of ``valid [B, H, W]`` pixels."""
    total = F.cross_entropy(logits.float(), pseudo_labels, ignore_index=ignore_index, reduction="sum")
    return total / valid.sum().clamp_min(1)


def transform_views(x: Tensor, kind: int) -> Tensor:
    """Apply transform ``kind`` to the last two dims: 0 horizontal flip, 1 vertical flip, 2-4
    rotation by 90 / 180 / 270 degrees counter-clockwise."""
    if kind == 0:
        return x.flip(-1)
    if kind == 1:
        return x.flip(-2)
    return torch.rot90(x, kind - 1, dims=(-2, -1))


def make_consistency_step(settings: SemiSettings, loss_fn: WeightedSumLoss, augmenters: list[PairedAugment],
                          ignore_index: int, seed: int, channels_last: bool = False,
                          wide_context: WideContextTraining | None = None) -> Callable[..., StepOutput]:
    """The step function of ``fixmatch`` / ``unimatch`` (module docstring) for the Trainer;
    ``wide_context`` for a wide-context student."""
    unimatch = settings.method == "unimatch"
    wide = wide_context

    def step(model: nn.Module, batch: dict[str, Any], context: StepContext) -> StepOutput:
        semi: SemiModel = getattr(model, "module", model)
        state = np.random.SeedSequence([seed, context.step, 11]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        images, masks = batch["image"], batch["mask"]
        augment = augmenters[context.stage_index]
        scale = context.stage.input_scale
        context_masks = None
        with torch.autocast(device_type=context.device.type, enabled=False):
            validity = torch.where(batch["valid_u"], 0, ignore_index).long()
            weak, validity = scale_batch(batch["image_u"], validity, scale)
            if wide is None:
                images, masks = scale_batch(images, masks, scale)
                images, masks = augment(images, masks, generator)
                weak, validity = augment.geometric(weak, validity, generator)
            else:
                images, masks, context_masks = scale_and_augment_with_context(
                    augment, images, masks, torch.stack(batch["context_mask"]).to(masks.device), scale,
                    wide.context_scale, generator)
                no_labels = torch.full_like(validity, ignore_index)  # the contexts' validity is not needed
                weak, validity, _ = augment_with_context(augment, weak, validity, no_labels, wide.context_scale,
                                                         generator, photometric=False)
        valid = validity != ignore_index
        context_channels = weak.shape[1] // 2 if wide is not None else 0
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
            weak = weak.contiguous(memory_format=torch.channels_last)
        n = images.shape[0]
        logs: dict[str, float] = {}

        # strong views (images only: their labels are the pseudo-labels, known after the forward)
        boxes_per_view, strong_images = [], []
        for _ in range(2 if unimatch else 1):
            with torch.autocast(device_type=context.device.type, enabled=False):
                view = strong_views(weak.float(), generator, context_channels)
                boxes = cutmix_boxes(n, weak.shape[-2], weak.shape[-1], generator,
                                     settings.cutmix_probability).to(weak.device)
                mixed = torch.where(boxes[:, None], view.roll(1, 0), view)
                if context_channels:  # the contexts stay each image's own
                    mixed = torch.cat([mixed[:, :-context_channels], view[:, -context_channels:]], dim=1)
                strong_images.append(mixed)
            boxes_per_view.append(boxes)
        perturb = ((lambda features: feature_dropout(features, settings.feature_dropout, generator))
                   if unimatch else None)
        kind = int(torch.randint(0, 5, (1,), generator=generator)) if settings.transform_consistency > 0 else None
        rotated = ids = None
        if settings.rotation_weight > 0 and semi.rotation_head is not None:
            side = min(weak.shape[-2:])
            top, left = (weak.shape[-2] - side) // 2, (weak.shape[-1] - side) // 2
            rotated, ids = random_rotations(weak[..., top:top + side, left:left + side], generator)

        # 2. every student pass in one forward (through DistributedDataParallel when distributed)
        outputs: StudentOutputs = model(images, weak, torch.cat(strong_images), feature_dropout=perturb,
                                        transformed=transform_views(weak, kind) if kind is not None else None,
                                        rotated=rotated)
        weak_logits = outputs.weak
        if isinstance(outputs.labeled, ContextOutput):
            sup, parts = loss_fn(outputs.labeled.logits, masks)
            context_loss, _ = loss_fn(outputs.labeled.context_logits, context_masks)
            weight = context_loss_weight(wide.weight, context.step, wide.total_steps)  # type: ignore[union-attr]
            sup = sup + weight * context_loss
            logs.update({"context_loss": float(context_loss.detach()), "context_weight": weight})
        else:
            sup, parts = loss_fn(outputs.labeled, masks)
        logs.update({f"sup_{k}": float(v.detach()) for k, v in parts.items()})

        # 3. pseudo-labels
        with torch.no_grad():
            if semi.teacher is not None:
                semi.teacher.eval()
                source = main_logits(semi.teacher(weak))
            else:
                source = weak_logits
            probabilities = torch.softmax(source.detach().float(), 1)
            pseudo = confident_pseudo_labels(probabilities, settings.threshold, valid, ignore_index)
        logs["confident"] = float((pseudo != ignore_index).sum() / valid.sum().clamp_min(1))
        # a rising confident share can hide a collapse onto one class: log that class's share
        counts = torch.bincount(pseudo[pseudo != ignore_index], minlength=1)
        logs["pseudo_top_share"] = float(counts.max() / counts.sum().clamp_min(1))

        # 4. strong-view losses against the pseudo-labels CutMixed with the same boxes
        strong_losses = []
        for part, boxes in zip(outputs.strong.split(n), boxes_per_view):
            labels = torch.where(boxes, pseudo.roll(1, 0), pseudo)
            view_valid = torch.where(boxes, valid.roll(1, 0), valid)
            strong_losses.append(unlabeled_loss(part, labels, view_valid, ignore_index))
        if unimatch:
            fp = unlabeled_loss(outputs.feature_perturbed, pseudo, valid, ignore_index)
            total = (sup + 0.25 * strong_losses[0] + 0.25 * strong_losses[1] + 0.5 * fp) / 2
            logs.update({"s1": float(strong_losses[0].detach()), "s2": float(strong_losses[1].detach()),
                         "fp": float(fp.detach())})
        else:
            total = sup + settings.unsup_weight * strong_losses[0]
            logs["s"] = float(strong_losses[0].detach())

        # optional terms
        if kind is not None:
            target = transform_views(torch.softmax(weak_logits.detach().float(), 1), kind)
            mask = transform_views(valid, kind)
            soft_ce = -(target * F.log_softmax(outputs.transformed.float(), 1)).sum(1)
            consistency = (soft_ce * mask).sum() / mask.sum().clamp_min(1)
            total = total + settings.transform_consistency * consistency
            logs["transform"] = float(consistency.detach())
        if outputs.rotation is not None:
            rotation = F.cross_entropy(outputs.rotation, ids)
            accuracy = (outputs.rotation.detach().argmax(1) == ids).float().mean()
            total = total + settings.rotation_weight * rotation
            logs.update({"rotation": float(rotation.detach()), "rotation_acc": float(accuracy)})
        return StepOutput(total, logs, n)

    return step
