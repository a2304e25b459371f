"""Typed configuration: YAML loading, overrides and the errors that name the bad key."""

from __future__ import annotations

import warnings
from pathlib import Path

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


def test_a_whole_stage_list_override_keeps_the_config_defaults_as_yaml_does(tmp_path):
    """``--set stages=[{steps: 180}]`` once reset the weak classifier's lr to the bare StageConfig's
    1e-3 (the YAML ``stages: [{steps: 180}]`` kept 6.25e-5): both now merge onto the default stage."""
    from labelwise.methods.weak.config import WeakConfig

    default = WeakConfig().stages[0]
    by_override = load_config(WeakConfig, None, ["stages=[{steps: 180}]"]).stages
    by_yaml = load_config(WeakConfig, write_yaml(tmp_path / "w.yaml", {"stages": [{"steps": 180}]})).stages
    assert by_override == by_yaml
    assert [(s.steps, s.lr, s.schedule, s.warmup_steps) for s in by_override] == \
        [(180, default.lr, default.schedule, default.warmup_steps)]
    two = load_config(TrainConfig, None, ["stages=[{steps: 5}, {steps: 6, lr: 0.5}]"]).stages
    assert [(s.steps, s.lr) for s in two] == [(5, TrainConfig().stages[0].lr), (6, 0.5)]


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


# --------------------------------------------------------------------- the earlier flat schedule layout

FLAT_LAYOUTS = {
    # class path: (flat YAML of the earlier layout, the same settings in stages + optim, extra overrides)
    "labelwise.methods.unsupervised:UnsupervisedConfig": (
        "steps: 600\nlr: 0.001\nweight_decay: 0.2\ngrad_clip: 5.0\n",
        "stages: [{steps: 600, lr: 0.001}]\noptim: {weight_decay: 0.2, grad_clip: 5.0}\n", []),
    "labelwise.methods.weak:WeakConfig": (
        "steps: 300\nlr: 0.0001\nweight_decay: 0.01\n",
        "stages: [{steps: 300, lr: 0.0001}]\noptim: {weight_decay: 0.01}\n", []),
    "labelwise.methods.pretrain:PretrainConfig": (
        "steps: 700\nlr: 0.001\nmin_lr: 0.00001\nwarmup_steps: 60\n",
        "stages: [{steps: 700, lr: 0.001, min_lr: 0.00001, warmup_steps: 60}]\n", ["data.images=[x]"]),
}


def _config_class(path: str) -> type:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", sorted(FLAT_LAYOUTS))
def test_flat_schedule_keys_load_at_their_new_place_with_a_warning(tmp_path, path):
    cls = _config_class(path)
    flat, nested, extra = FLAT_LAYOUTS[path]
    (tmp_path / "flat.yaml").write_text(flat)
    (tmp_path / "nested.yaml").write_text(nested)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = load_config(cls, tmp_path / "flat.yaml", extra)
    moved = {key: f"{key} moved to" for key in yaml.safe_load(flat)}
    messages = [str(w.message) for w in caught if w.category is FutureWarning]
    assert len(messages) == len(moved)
    for key in moved:  # each flat key is named with its new place
        where = f"stages.0.{key}" if key in ("steps", "lr", "min_lr", "warmup_steps") else f"optim.{key}"
        assert f"config key '{key}' moved to '{where}'" in " ".join(messages)
    new = load_config(cls, tmp_path / "nested.yaml", extra)
    assert old == new
    expected = yaml.safe_load(nested)
    assert old.stages[0].steps == expected["stages"][0]["steps"]
    assert old.stages[0].lr == expected["stages"][0]["lr"]
    # the keys the YAML does not set keep the regime's own defaults (e.g. its schedule shape)
    assert old.stages[0].schedule == cls().stages[0].schedule
    with pytest.warns(FutureWarning, match=r"'lr' moved to 'stages.0.lr'"):
        overridden = load_config(cls, tmp_path / "nested.yaml", [*extra, "lr=0.003"])
    assert overridden.stages[0].lr == 0.003


def test_a_flat_key_given_at_both_places_is_an_error_naming_both(tmp_path):
    cls = _config_class("labelwise.methods.unsupervised:UnsupervisedConfig")
    (tmp_path / "both.yaml").write_text("steps: 10\nstages: [{steps: 20}]\n")
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match=r"steps: moved to stages.0.steps, which is"):
        load_config(cls, tmp_path / "both.yaml")


def test_pretrain_steps_null_beside_epochs_still_loads(tmp_path):
    cls = _config_class("labelwise.methods.pretrain:PretrainConfig")
    (tmp_path / "epochs.yaml").write_text("steps: null\nepochs: 2\ndata: {images: [x]}\n")
    with pytest.warns(FutureWarning):
        config = load_config(cls, tmp_path / "epochs.yaml")
    assert config.epochs == 2 and config.stages[0].steps == cls().stages[0].steps


@pytest.mark.parametrize("path", sorted(FLAT_LAYOUTS))
def test_single_stage_regimes_refuse_stage_keys_they_do_not_read(path):
    cls = _config_class(path)
    extra = FLAT_LAYOUTS[path][2]
    with pytest.raises(ConfigError, match=r"stages.0.augment: not read by"):
        load_config(cls, None, [*extra, "stages.0.augment.hflip=0.1"])
    with pytest.raises(ConfigError, match=r"stages: .* one stage, got 2"):
        load_config(cls, None, [*extra, "stages.1.steps=5"])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_with_its_regime(path: Path) -> None:
    from labelwise.methods.pretrain import PretrainConfig
    from labelwise.methods.semi import SemiConfig
    from labelwise.methods.unsupervised.config import UnsupervisedConfig
    from labelwise.methods.weak.config import WeakConfig

    classes = {"pretrain": PretrainConfig, "semi": SemiConfig, "unsupervised": UnsupervisedConfig,
               "weak": WeakConfig, "refine": TrainConfig}
    cls = classes.get(path.name.split("_")[0], TrainConfig)
    semi = (yaml.safe_load(path.read_text()) or {}).get("semi") or {}
    # the semi-supervised recipes leave the unlabeled part to the command line (a split list)
    needs_list = cls is SemiConfig and not any(k.startswith("unlabeled") for k in semi)
    config = load_config(cls, path, ["semi.unlabeled_list=unlabeled.txt"] if needs_list else [])
    if hasattr(config, "validate"):
        config.validate()


def test_config_errors_name_the_file_only_for_keys_the_file_sets(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text("seed: abc\nstages:\n- {steps: 10, warmup_steps: 20}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: seed: expected an integer"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"^seed: expected an integer, got 'x'"):
        load_config(TrainConfig, path, ["seed=x"])
    path.write_text("stages:\n- {steps: 10, warmup_steps: 20}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: stages\.0\.warmup_steps"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match=r"^data\.batch_size: must be >= 1"):
        load_config(TrainConfig, path, ["stages.0.warmup_steps=1", "data.batch_size=0"])
