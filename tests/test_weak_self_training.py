"""Self-training rounds of ``weak run``: the tag restriction and the confident-pixel labels equal a
literal per-pixel computation from the teacher's scores, rounds chain (each teaches the next) and
are not redone on resume, and bad settings name their key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import labelwise
from labelwise.config import load_config
from labelwise.data.pseudo_labels import IGNORE_INDEX, margin_confidence, restrict_scores
from labelwise.errors import ConfigError
from labelwise.methods.weak.config import WeakConfig
from labelwise.methods.weak.pipeline import run, segmenter_config, tagged_items
from labelwise.models import create_vit
from labelwise.models.vit_loading import save_vit


def test_restricted_margin_equals_a_per_pixel_loop_over_the_allowed_classes() -> None:
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 5, 3, 4, generator=generator)
    allowed = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    ids, margin = margin_confidence(restrict_scores(scores, allowed))
    for b in range(4):
        classes = [c for c in range(5) if allowed[b, c]] or list(range(5))  # none allowed: unrestricted
        for y in range(3):
            for x in range(4):
                ranked = sorted(classes, key=lambda c: -float(scores[b, c, y, x]))
                assert int(ids[b, y, x]) == ranked[0]
                expected = (math.inf if len(ranked) == 1
                            else float(scores[b, ranked[0], y, x]) - float(scores[b, ranked[1], y, x]))
                assert float(margin[b, y, x]) == pytest.approx(expected, abs=1e-6)


def _config(tmp_path: Path, *extra: str) -> WeakConfig:
    torch.manual_seed(0)
    vit = save_vit(create_vit("custom", 8, embed_dim=32, depth=2, num_heads=2), tmp_path / "vit.safetensors")
    return load_config(WeakConfig, None, [
        "data.dataset=synthetic", "data.synthetic_train_images=6", "data.synthetic_val_images=3",
        "data.synthetic_size=[32, 48]", f"backbone={vit}", "image_size=[32, 48]", "stages.0.steps=3",
        "batch_size=4", f"run_dir={tmp_path / 'run'}", "device=cpu", "progress=false", "checkpoint_every=20",
        "precision=fp32", "cams.blocks=2", "pseudo_masks.background_class=0",
        'segmenter_overrides=["stages.0.steps=4", "data.batch_size=2", "model.options={width: 8}"]', *extra])


def _reference_labels(scores: torch.Tensor, tags: torch.Tensor, fraction: float) -> np.ndarray:
    """Literal pseudo-labels of one image: per pixel the best class among the tagged ones and the
    background, its lead over the second; per class the ``floor(f * n + 0.5)`` (at least 1) pixels
    of largest lead (ties in raster order) keep it, the rest 255."""
    k, h, w = scores.shape
    allowed = [c for c in range(k) if c == 0 or tags[c] > 0]
    best = np.zeros((h, w), dtype=np.int64)
    lead = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            ranked = sorted(allowed, key=lambda c: -float(scores[c, y, x]))
            best[y, x] = ranked[0]
            lead[y, x] = math.inf if len(ranked) == 1 else float(scores[ranked[0], y, x] - scores[ranked[1], y, x])
    out = np.full((h, w), IGNORE_INDEX, dtype=np.int64)
    for c in allowed:
        pixels = [(y, x) for y in range(h) for x in range(w) if best[y, x] == c]
        if not pixels:
            continue
        keep = max(1, math.floor(fraction * len(pixels) + 0.5))
        for y, x in sorted(pixels, key=lambda p: -lead[p])[:keep]:
            out[y, x] = c
    return out


def test_rounds_label_from_the_teacher_restricted_to_tags_chain_and_resume(tmp_path: Path) -> None:
    config = _config(tmp_path, "self_training.rounds=2", "self_training.keep_fraction=0.4",
                     'self_training.segmenter_overrides=["stages.0.steps=3"]')
    report = run(config)
    run_dir = tmp_path / "run"
    rounds = report["self_training"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert report["model"] == str(run_dir / "self_training" / "round2" / "segmenter")
    assert rounds[0]["pseudo_labels"]["teacher"] == str(run_dir / "segmenter")
    assert rounds[1]["pseudo_labels"]["teacher"] == str(run_dir / "self_training" / "round1" / "segmenter")
    assert rounds[0]["segmenter"]["steps"] == 3 and report["segmenter"]["steps"] == 4  # the round's overrides
    assert 0 <= rounds[1]["final"]["miou"] <= 1 and rounds[1]["final"]["split"] == "val"

    # round 1's labels equal the literal rule applied to the first segmenter's own scores
    teacher = labelwise.load(run_dir / "segmenter", device="cpu", precision="fp32")
    items, _ = tagged_items(config)
    samples = [items[i] for i in range(len(items))]
    scores = torch.cat([teacher.scores(torch.stack([s["image"] for s in samples[i:i + 4]]))
                        for i in range(0, len(samples), 4)])
    labels_dir = run_dir / "self_training" / "round1" / "pseudo" / "train" / "labels"
    kept = total = 0
    for index, sample in enumerate(samples):
        written = np.asarray(Image.open(labels_dir / f"{sample['name']}.png")).astype(np.int64)
        expected = _reference_labels(scores[index], sample["tags"], 0.4)
        np.testing.assert_array_equal(written, expected)
        untagged = [c for c in range(1, 5) if sample["tags"][c] == 0]
        assert not np.isin(written, untagged).any()
        kept += int((written != IGNORE_INDEX).sum())
        total += written.size
    assert rounds[0]["pseudo_labels"]["kept_fraction"] == pytest.approx(kept / total, abs=1e-6)
    classes = json.loads((labels_dir.parents[1] / "classes.json").read_text())
    assert classes["ignore_index"] == IGNORE_INDEX and len(classes["classes"]) == 5

    # a finished run resumes without redoing the labels; the delivered model predicts the classes
    marker = labels_dir.parents[1] / "pseudo_labels.json"
    before = marker.stat().st_mtime_ns
    again = run(config, resume=True)
    assert marker.stat().st_mtime_ns == before
    assert again["self_training"][1]["final"]["miou"] == pytest.approx(rounds[1]["final"]["miou"])
    model = labelwise.load(run_dir, device="cpu")  # the run folder loads as its last round's segmenter
    assert model.folder.resolve() == Path(again["model"]).resolve() and again["model_subfolder"] == \
        "self_training/round2/segmenter"
    assert list(model.class_map.names) == list(teacher.class_map.names)


def test_round_segmenters_take_the_self_training_overrides_last(tmp_path: Path) -> None:
    config = _config(tmp_path, 'self_training.segmenter_overrides=["stages.0.steps=7"]')
    assert segmenter_config(config, tmp_path / "p", tmp_path / "s").stages[0].steps == 4
    assert segmenter_config(config, tmp_path / "p", tmp_path / "s", self_training=True).stages[0].steps == 7


@pytest.mark.parametrize("override, key", [("self_training.keep_fraction=0", "self_training.keep_fraction"),
                                           ("self_training.rounds=-1", "self_training.rounds"),
                                           ('self_training.segmenter_overrides=["steps"]',
                                            "self_training.segmenter_overrides.0")])
def test_bad_self_training_settings_name_their_key(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _config(tmp_path, override).validate()
