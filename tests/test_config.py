"""Typed configuration: YAML loading, overrides and the errors that name the bad key."""

from __future__ import annotations

import pytest
import yaml

from labelwise.config import TrainConfig, load_config, save_config
from labelwise.errors import ConfigError


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_values_and_defaults(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"optim": {"name": "sgd", "grad_clip": 5}, "stages": [{"steps": 10}, {"steps": 5, "lr": 0.01}]})
    config = load_config(TrainConfig, path)
    assert config.optim.name == "sgd"
    assert config.optim.grad_clip == 5.0 and isinstance(config.optim.grad_clip, float)
    assert [s.steps for s in config.stages] == [10, 5]
    assert config.stages[0].lr == TrainConfig().stages[0].lr  # default kept for keys not given
    assert config.stages[1].lr == 0.01
    assert config.total_steps == 15


@pytest.mark.parametrize(
    "data, key",
    [
        ({"optim": {"lrr": 0.1}}, "optim.lrr"),
        ({"stages": [{"steps": 10, "agument": {}}]}, "stages.0.agument"),
        ({"nonsense": 1}, "nonsense"),
        ({"stages": [{"steps": "many"}]}, "stages.0.steps"),
        ({"precision": "fp16"}, "precision"),
        ({"stages": [{"augment": {"scale": [0.5]}}]}, "stages.0.augment.scale"),
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"loss": {"terms": [{"name": "ce", "wieght": 1}]}}, "loss.terms.0.wieght"),
    ],
)
def test_bad_keys_and_values_name_the_key(tmp_path, data, key):
    path = write_yaml(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, path)
    assert key in str(info.value)


def test_overrides(tmp_path):
    config = load_config(TrainConfig, None, ["stages.0.lr=0.02", "stages.1.steps=7", "model.options={width: 16}",
                                             "optim.betas=[0.8, 0.9]"])
    assert config.stages[0].lr == 0.02
    assert len(config.stages) == 2 and config.stages[1].steps == 7 and config.stages[1].lr == 0.02
    assert config.model.options == {"width": 16}
    assert config.optim.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="optim.nope"):
        load_config(TrainConfig, None, ["optim.nope=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(TrainConfig, None, ["optim.name"])


def test_save_and_reload_round_trip(tmp_path):
    config = load_config(TrainConfig, None, ["stages.0.augment.crop_size=[64, 96]", "loss.class_weights=balanced"])
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(TrainConfig, tmp_path / "saved.yaml") == config


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_exponent_notation_without_a_dot_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-3`` as the string '1e-3'; config floats accept it."""
    path = tmp_path / "c.yaml"
    path.write_text("optim: {weight_decay: 5e-4}\nstages:\n  - {steps: 3, lr: 2E-3}\n")
    config = load_config(TrainConfig, path)
    assert config.optim.weight_decay == 0.0005 and config.stages[0].lr == 0.002
    assert load_config(TrainConfig, path, ["stages.0.lr=1e-12"]).stages[0].lr == 1e-12
    with pytest.raises(ConfigError, match="stages.0.lr: expected a number, got 'e-3'"):
        load_config(TrainConfig, path, ["stages.0.lr=e-3"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(TrainConfig, path, ["stages.0.steps=1e3"])
