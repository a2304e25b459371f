"""Evaluate a segmentation model over a whole dataset split (the one evaluation protocol)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from labelwise.config import EvalConfig
from labelwise.data import pad_collate
from labelwise.engine.runtime import autocast
from labelwise.eval.metrics import ConfusionMatrix, SegmentationMetrics
from labelwise.eval.sliding_window import predict_logits


def make_logits_fn(model: nn.Module, device: torch.device, precision: str, input_scale: float = 1.0,
                   flip: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images [B, 3, H, W] → float32 logits [B, C, H, W]`` under the chosen precision.

    With ``input_scale != 1`` the images are resized before the model and the logits resized
    back (bilinear) to the input size. With ``flip`` the logits of the horizontally mirrored
    images (mirrored back) are averaged in. Inputs follow the memory format of the model's weights.
    """
    channels_last = any(
        p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )

    def logits_fn(images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if input_scale != 1.0:
            size = (max(1, round(height * input_scale)), max(1, round(width * input_scale)))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(device, precision):
            logits = model(images).float()
            if flip:
                logits = 0.5 * (logits + model(images.flip(-1)).float().flip(-1))
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits

    logits_fn.context_scale = getattr(model, "context_scale", None)  # type: ignore[attr-defined]
    return logits_fn


def predict_batch(logits_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, num_classes: int,
                  config: EvalConfig) -> torch.Tensor:
    """Float32 logits ``[B, C, H, W]`` for ``images [B, 3, H, W]``, by sliding window when
    ``config.window`` is set and the image is larger than the window."""
    return predict_logits(logits_fn, images, num_classes, window=config.window, overlap=config.overlap,
                          batch_windows=config.batch_size, context_scale=getattr(logits_fn, "context_scale", None))


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    config: EvalConfig,
    device: torch.device,
    precision: str = "bf16",
    ignore_index: int = 255,
) -> SegmentationMetrics:
    """Confusion matrix over every pixel of ``dataset`` (ignore pixels excluded), then metrics.

    Images of one batch that differ in size (padded by the collate) are predicted one by one at
    their own size, so padding never changes a prediction.
    """
    was_training = model.training
    model.eval()
    logits_fn = make_logits_fn(model, device, precision, config.input_scale, config.flip)
    confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    batch_size = 1 if config.window else config.batch_size
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=pad_collate)
    for batch in loader:
        images = batch["image"].to(device)
        masks = batch["mask"].to(device)
        sizes = batch["sizes"]
        if bool((sizes == sizes[0]).all()) and tuple(sizes[0].tolist()) == tuple(images.shape[-2:]):
            prediction = predict_batch(logits_fn, images, num_classes, config).argmax(1)
            confusion.update(prediction, masks)
            continue
        for index, (height, width) in enumerate(sizes.tolist()):
            image = images[index : index + 1, :, :height, :width]
            prediction = predict_batch(logits_fn, image, num_classes, config).argmax(1)
            confusion.update(prediction, masks[index : index + 1, :height, :width])
    model.train(was_training)
    return confusion.compute()

