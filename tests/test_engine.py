"""Training engine: schedules, sampler, atomic checkpoints and exact resume."""

from __future__ import annotations

import errno
import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from labelwise.config import StageConfig
from labelwise.engine.sampler import ResumableBatchSampler
from labelwise.engine.schedule import lr_at
from labelwise.errors import CheckpointError
from labelwise.io import checkpoint as ckpt
from labelwise.methods import supervised


def test_schedules_match_their_formulas():
    poly = StageConfig(steps=100, lr=0.1, schedule="poly", warmup_steps=10, poly_power=0.9, min_lr=0.001)
    cosine = StageConfig(steps=50, lr=0.01, schedule="cosine", min_lr=0.0)
    stages = [poly, cosine]
    assert lr_at(stages, 0) == pytest.approx(0.1 * 1 / 10)
    assert lr_at(stages, 9) == pytest.approx(0.1)
    t = (40 - 10) / 90
    assert lr_at(stages, 40) == pytest.approx(0.001 + (0.1 - 0.001) * (1 - t) ** 0.9)
    assert lr_at(stages, 100) == pytest.approx(0.01)  # second stage starts at its peak
    assert lr_at(stages, 125) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 25 / 50)))
    constant = StageConfig(steps=5, lr=0.3, schedule="constant")
    assert lr_at([constant], 4) == pytest.approx(0.3)


def test_sampler_shards_are_disjoint_and_resumable():
    full = list(ResumableBatchSampler(40, 4, seed=3))
    ranks = [list(ResumableBatchSampler(40, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    for a, b in zip(*ranks):
        assert not set(a) & set(b)
    resumed = ResumableBatchSampler(40, 4, seed=3)
    resumed.set_position(0, 6)
    assert list(resumed) == full[6:]
    other_epoch = ResumableBatchSampler(40, 4, seed=3)
    other_epoch.set_position(1)
    assert list(other_epoch) != full


def _weights(run_dir):
    return load_file(str(run_dir / "weights.safetensors"))


@pytest.mark.parametrize("stop_at", [4, 6])  # about N/2 of the 9 steps, and one step past the stage change
def test_exact_resume_gives_identical_weights(tiny_config, tmp_path, stop_at):
    config = replace(tiny_config, checkpoint_every=3)
    config.stages = [replace(config.stages[0], steps=5), StageConfig(steps=4, lr=1e-3, input_scale=0.5)]
    config.data = replace(config.data, batch_size=4, synthetic_train_images=12)  # 3 batches per epoch
    straight = replace(config, run_dir=str(tmp_path / "straight"))
    supervised.train(straight)

    interrupted = replace(config, run_dir=str(tmp_path / "interrupted"))
    partial = supervised.train(interrupted, stop_at=stop_at)
    assert partial.train.steps == stop_at and not (tmp_path / "interrupted" / "weights.safetensors").exists()
    with pytest.raises(CheckpointError, match="--resume"):
        supervised.train(interrupted)
    supervised.train(interrupted, resume=True)

    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "interrupted")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 9 and "images_per_second" in log[-1]


def test_resume_without_checkpoint_starts_at_step_zero_like_a_fresh_run(tiny_config, tmp_path):
    """A run killed before its first checkpoint is resumed with the same command."""
    from safetensors.torch import load_file

    from labelwise.config import to_dict

    with pytest.warns(UserWarning, match="holds no checkpoint yet; training starts at step 0"):
        resumed = supervised.train(tiny_config, resume=True)
    fresh_config = type(tiny_config)(**{**vars(tiny_config), "run_dir": str(tmp_path / "fresh")})
    assert to_dict(fresh_config)["stages"] == to_dict(tiny_config)["stages"]
    fresh = supervised.train(fresh_config)
    assert resumed.train.steps == fresh.train.steps == 8
    first = load_file(str(resumed.run_dir / "weights.safetensors"))
    second = load_file(str(fresh.run_dir / "weights.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_crash_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    first = ckpt.TrainingCheckpoint(1, model.state_dict(), optimizer.state_dict(), {"epoch": 0}, [ckpt.capture_rng_state()])
    ckpt.save_training_checkpoint(tmp_path, first)

    def exploding_save(*args, **kwargs):
        raise OSError(errno.ENOSPC, "disk full")

    monkeypatch.setattr(ckpt, "save_file", exploding_save)
    with pytest.raises(CheckpointError, match=r"step_0000002: cannot write the checkpoint \(disk full\); the "
                                              r"previous checkpoint step_0000001 is intact.*--resume"):
        ckpt.save_training_checkpoint(tmp_path, replace(first, step=2))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", "step_0000001"]
    folder = ckpt.latest_checkpoint_dir(tmp_path)
    loaded = ckpt.load_training_checkpoint(folder)
    assert loaded.step == 1
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model_state[key], value)
    assert loaded.optimizer_state["state"][0]["exp_avg"].shape == (2, 3)


def test_truncated_checkpoint_names_the_file(tmp_path):
    model = torch.nn.Linear(3, 2)
    state = ckpt.TrainingCheckpoint(1, model.state_dict(), torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
                                    {}, [ckpt.capture_rng_state()])
    folder = ckpt.save_training_checkpoint(tmp_path, state)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.load_training_checkpoint(folder)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    ckpt.restore_rng_state(*state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_strict_load_names_keys_and_shapes():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="missing keys.*bias"):
        ckpt.load_state_strict(model, {"weight": torch.zeros(2, 3)}, "w.safetensors")
    with pytest.raises(CheckpointError, match="'weight' has shape"):
        ckpt.load_state_strict(model, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "w.safetensors")


def test_lr_scale_groups_parameters_and_multiplies_the_stage_lr(tmp_path):
    from labelwise.config import OptimConfig
    from labelwise.engine.trainer import StepOutput, Trainer, TrainerOptions

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    options = TrainerOptions(stages=[StageConfig(steps=2, lr=0.01, schedule="constant", warmup_steps=0)],
                             optim=OptimConfig(name="adamw", weight_decay=0.1), run_dir=tmp_path,
                             device=torch.device("cpu"), precision="fp32", batch_size=2, progress=False,
                             checkpoint_every=10, lr_scale=lambda name: 5.0 if name.startswith("1.") else 1.0)
    data = [{"x": torch.randn(3)} for _ in range(4)]

    def step(model, batch, context):
        return StepOutput(model(batch["x"]).square().mean(), {}, batch["x"].shape[0])

    trainer = Trainer(model, data, step, options, collate_fn=torch.utils.data.default_collate)
    trainer.fit()
    groups = {(g["weight_decay"], g["lr_scale"]): g for g in trainer.optimizer.param_groups}
    assert set(groups) == {(0.1, 1.0), (0.0, 1.0), (0.1, 5.0), (0.0, 5.0)}
    assert groups[(0.1, 5.0)]["params"][0] is model[1].weight and groups[(0.0, 5.0)]["params"][0] is model[1].bias
    assert groups[(0.1, 1.0)]["params"][0] is model[0].weight
    for (_, scale), group in groups.items():
        assert group["lr"] == pytest.approx(0.01 * scale)


def test_a_value_logged_by_some_steps_is_averaged_over_those_steps(tmp_path):
    from labelwise.config import OptimConfig
    from labelwise.engine.trainer import StepOutput, Trainer, TrainerOptions

    model = torch.nn.Linear(3, 1)
    options = TrainerOptions(stages=[StageConfig(steps=8, lr=0.01, schedule="constant", warmup_steps=0)],
                             optim=OptimConfig(name="adamw"), run_dir=tmp_path, device=torch.device("cpu"),
                             precision="fp32", batch_size=2, progress=False, checkpoint_every=100, log_every=4)
    data = [{"x": torch.randn(3)} for _ in range(4)]

    def step(model, batch, context):
        logs = {"every": float(context.step)}
        if context.step % 4 == 0:  # a monitor measured every 4th step only (steps 0 and 4)
            logs["monitor"] = 10.0 + context.step
        return StepOutput(model(batch["x"]).square().mean(), logs, batch["x"].shape[0])

    Trainer(model, data, step, options, collate_fn=torch.utils.data.default_collate).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "every" in r]
    assert [r["step"] for r in logged] == [4, 8]
    assert [r["every"] for r in logged] == [1.5, 5.5]  # steps 0-3 and 4-7
    assert [r["monitor"] for r in logged] == [10.0, 14.0]  # one measurement per window, not diluted
