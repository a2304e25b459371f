"""Whole-split evaluation: variable image sizes, sliding window, flip test-time augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from labelwise.config import EvalConfig
from labelwise.data.base import SegmentationDataset
from labelwise.data.classmap import ClassMap
from labelwise.eval.evaluate import evaluate_model, make_logits_fn


class RandomSizes(SegmentationDataset):
    """Images of different sizes whose masks are random class ids, some pixels ignored."""

    def __init__(self, sizes, num_classes=3, seed=0):
        self.class_map = ClassMap.from_names([f"c{i}" for i in range(num_classes)])
        rng = np.random.default_rng(seed)
        self.items = []
        for i, (h, w) in enumerate(sizes):
            mask = rng.integers(0, num_classes, (h, w))
            mask[rng.random((h, w)) < 0.1] = 255
            image = rng.random((3, h, w)).astype(np.float32)
            self.items.append({"image": torch.from_numpy(image), "mask": torch.from_numpy(mask), "name": f"s{i}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class ConvModel(nn.Module):
    """A small fully convolutional net with zero padding (so padding would change borders)."""

    def __init__(self, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def reference_confusion(model, dataset, num_classes, flip=False):
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for index in range(len(dataset)):
        sample = dataset[index]
        with torch.no_grad():
            logits = model(sample["image"][None])
            if flip:
                logits = (logits + model(sample["image"][None].flip(-1)).flip(-1)) / 2
        prediction = logits.argmax(1)[0].numpy()
        mask = sample["mask"].numpy()
        for t, p in zip(mask.ravel(), prediction.ravel()):
            if t != 255:
                confusion[t, p] += 1
    return confusion


@pytest.mark.parametrize("flip", [False, True])
def test_variable_sizes_are_never_padded_into_predictions(flip):
    dataset = RandomSizes([(17, 23), (17, 23), (30, 11), (9, 40)])
    model = ConvModel()
    config = EvalConfig(batch_size=4, flip=flip)
    metrics = evaluate_model(model, dataset, 3, config, torch.device("cpu"), precision="fp32")
    confusion = reference_confusion(model, dataset, 3, flip=flip)
    assert metrics.pixel_acc == pytest.approx(np.trace(confusion) / confusion.sum())
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    assert metrics.miou == pytest.approx(iou.mean())


def test_sliding_window_evaluation_covers_every_pixel():
    dataset = RandomSizes([(40, 52)])
    model = ConvModel()
    whole = evaluate_model(model, dataset, 3, EvalConfig(), torch.device("cpu"), precision="fp32")
    windowed = evaluate_model(model, dataset, 3, EvalConfig(window=64), torch.device("cpu"), precision="fp32")
    assert windowed.pixel_acc == pytest.approx(whole.pixel_acc)
    small = evaluate_model(model, dataset, 3, EvalConfig(window=16, overlap=0.5), torch.device("cpu"), precision="fp32")
    assert small.num_pixels == whole.num_pixels


def test_input_scale_returns_full_resolution_logits():
    model = ConvModel()
    images = torch.rand(2, 3, 21, 30)
    logits = make_logits_fn(model, torch.device("cpu"), "fp32", input_scale=0.5)(images)
    assert logits.shape == (2, 3, 21, 30) and logits.dtype == torch.float32
