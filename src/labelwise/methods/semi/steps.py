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
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.data.transforms import PairedAugment, scale_batch
from labelwise.engine.trainer import StepContext, StepOutput
from labelwise.losses import WeightedSumLoss
from labelwise.losses.rotation import random_rotations
from labelwise.methods.semi.config import SemiSettings
from labelwise.methods.semi.model import SemiModel, StudentOutputs, main_logits
from labelwise.methods.semi.perturb import confident_pseudo_labels, cutmix_boxes, feature_dropout, strong_photometric

__all__ = ["make_consistency_step", "transform_views", "unlabeled_loss"]


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
                          ignore_index: int, seed: int, channels_last: bool = False) -> Callable[..., StepOutput]:
    """The step function of ``fixmatch`` / ``unimatch`` (module docstring) for the Trainer."""
    unimatch = settings.method == "unimatch"

    def step(model: nn.Module, batch: dict[str, Any], context: StepContext) -> StepOutput:
        semi: SemiModel = getattr(model, "module", model)
        state = np.random.SeedSequence([seed, context.step, 11]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        images, masks = batch["image"], batch["mask"]
        augment = augmenters[context.stage_index]
        with torch.autocast(device_type=context.device.type, enabled=False):
            images, masks = scale_batch(images, masks, context.stage.input_scale)
            images, masks = augment(images, masks, generator)
            validity = torch.where(batch["valid_u"], 0, ignore_index).long()
            weak, validity = scale_batch(batch["image_u"], validity, context.stage.input_scale)
            weak, validity = augment.geometric(weak, validity, generator)
        valid = validity != ignore_index
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
            weak = weak.contiguous(memory_format=torch.channels_last)
        n = images.shape[0]
        logs: dict[str, float] = {}

        # strong views (images only: their labels are the pseudo-labels, known after the forward)
        boxes_per_view, strong_images = [], []
        for _ in range(2 if unimatch else 1):
            with torch.autocast(device_type=context.device.type, enabled=False):
                view = strong_photometric(weak.float(), generator)
                boxes = cutmix_boxes(n, weak.shape[-2], weak.shape[-1], generator,
                                     settings.cutmix_probability).to(weak.device)
                strong_images.append(torch.where(boxes[:, None], view.roll(1, 0), view))
            boxes_per_view.append(boxes)
        perturb = (lambda features: feature_dropout(features, settings.feature_dropout, generator)) if unimatch else None
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
