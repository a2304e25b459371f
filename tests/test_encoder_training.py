"""Transfer learning with a pretrained encoder in every regime: freezing, BatchNorm freezing, the
encoder learning-rate multiplier, `--init` by weights name, semi-supervised and pretraining on the
MobileNetV2 encoder, and a short training from the shared ImageNet weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from labelwise.config import TrainConfig, load_config
from labelwise.engine.segmenter import trainer_options
from labelwise.engine.trainer import build_optimizer
from labelwise.errors import ConfigError
from labelwise.methods import supervised
from labelwise.models import MobileNetV2, create
from labelwise.models.init import initialise_from
from labelwise.models.pretrained import SHARED_WEIGHTS_DIR, WEIGHTS_ENV

TINY = ["data.synthetic_train_images=8", "data.synthetic_val_images=2", "data.synthetic_size=[32, 48]",
        "data.batch_size=4", "stages.0.steps=4", "device=cpu", "precision=fp32", "progress=false",
        "checkpoint_every=2"]
ENCODER = "model.options={encoder: mobilenet_v2, encoder_weights: null, decoder_channels: [16, 16, 8, 8, 8]}"


def _weights_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision-layout file with random weights and non-trivial BatchNorm statistics, so the
    encoder's starting point does not depend on the run's RNG use."""
    torch.manual_seed(7)
    state = MobileNetV2().state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
        elif key.endswith("running_mean"):
            state[key] = torch.randn_like(value) * 0.1
    path = tmp_path / "encoder_start.pth"
    torch.save(state, path)
    return path, state


def _config(tmp_path: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [*TINY, ENCODER, f"run_dir={tmp_path / 'run'}", *extra])


def _from_file(tmp_path: Path, *extra: str) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    path, state = _weights_file(tmp_path)
    options = (f"model.options={{encoder: mobilenet_v2, encoder_weights: {path}, encoder_convention: tf, "
               "decoder_channels: [16, 16, 8, 8, 8]}")
    return _config(tmp_path, options, *extra), state


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Weights of an exported run folder, or of a training checkpoint folder."""
    exported = folder / "weights.safetensors"
    return load_file(str(exported if exported.is_file() else folder / "model.safetensors"))


def test_frozen_encoder_stays_bit_identical(tmp_path):
    config, start = _from_file(tmp_path, "model.freeze_encoder=true")
    supervised.train(config)
    final = _weights(tmp_path / "run")
    middle = _weights(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[0])  # after step 2 of 4
    encoder = [k for k in final if k.startswith("encoder.")]
    assert len(encoder) == len([k for k in start if not k.startswith("classifier.")])
    for key in encoder:
        assert torch.equal(final[key], start[key.removeprefix("encoder.")]), key
    assert not torch.equal(middle["classifier.conv.weight"], final["classifier.conv.weight"])  # the decoder trains


def test_frozen_encoder_bn_keeps_statistics_but_trains_weights(tmp_path):
    config, start = _from_file(tmp_path, "model.freeze_encoder_bn=true")
    supervised.train(config)
    final = _weights(tmp_path / "run")
    middle = _weights(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[0])  # after step 2 of 4
    stats = [k for k in final if k.startswith("encoder.") and ("running_" in k or "num_batches" in k)]
    assert stats and all(torch.equal(final[k], start[k.removeprefix("encoder.")]) for k in stats)
    assert not torch.equal(final["encoder.features.0.0.weight"], start["features.0.0.weight"])
    decoder_stats = [k for k in final if k.startswith("decoder.") and k.endswith("running_mean")]
    assert any(not torch.equal(middle[k], final[k]) for k in decoder_stats)  # the decoder's BN still learns


def test_bn_freezing_defaults_to_the_folded_weights_only(tmp_path):
    from labelwise.models.init import configure_encoder

    torch.save(MobileNetV2().state_dict(), tmp_path / "mobilenet_v2_imagenet.pth")
    torch.save(MobileNetV2().state_dict(), tmp_path / "mobilenet_v2-b0353104.pth")
    config = _config(tmp_path)
    for file_name, expected in (("mobilenet_v2_imagenet.pth", True), ("mobilenet_v2-b0353104.pth", False)):
        model = create("unet", num_classes=2, encoder="mobilenet_v2", encoder_weights=str(tmp_path / file_name))
        assert configure_encoder(model, config.model)["freeze_encoder_bn"] is expected
        model.train()
        bn = model.encoder.features[0][1]
        assert bn.training is not expected


def test_encoder_lr_scale_reaches_the_optimizer(tmp_path):
    config = _config(tmp_path, "model.encoder_lr_scale=0.1")
    model = create(config.model.name, num_classes=5, **config.model.options)
    options = trainer_options(config, tmp_path, torch.device("cpu"), model)
    optimizer = build_optimizer(model, config.optim, 1e-3, options.lr_scale)
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    for group in optimizer.param_groups:
        in_encoder = {id(p) in encoder_ids for p in group["params"]}
        assert len(in_encoder) == 1
        assert group["lr"] == pytest.approx(1e-4 if in_encoder.pop() else 1e-3)
    with pytest.raises(ConfigError, match="model.encoder_lr_scale"):
        _config(tmp_path, "model.encoder_lr_scale=0").validate()


def test_init_by_weights_name(tmp_path, monkeypatch):
    torch.manual_seed(3)
    state = MobileNetV2().state_dict()
    torch.save(state, tmp_path / "mobilenet_v2_imagenet.pth")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    model = create("unet", num_classes=3, encoder="mobilenet_v2", encoder_weights=None)
    report = initialise_from(model, "mobilenet_v2_imagenet", verbose=False)
    assert len(report.loaded) == len(model.encoder.state_dict())
    assert {item["name"] for item in report.ignored} == {"classifier.1.weight", "classifier.1.bias"}
    torch.testing.assert_close(model.encoder.features[7].conv[1][0].weight, state["features.7.conv.1.0.weight"])
    symmetric = create("unet", num_classes=3, encoder="mobilenet_v2", encoder_weights=None,
                       encoder_convention="torchvision")
    with pytest.raises(ConfigError, match="input convention 'tf'"):
        initialise_from(symmetric, "mobilenet_v2_imagenet", verbose=False)


def test_semi_unimatch_on_a_frozen_encoder_unet(tmp_path):
    from labelwise.data.build import build_datasets
    from labelwise.data.splits import dataset_names, split_labeled, write_split
    from labelwise.methods.semi import SemiConfig, train

    path, start = _weights_file(tmp_path)
    data = ["data.dataset=synthetic", "data.synthetic_train_images=8", "data.synthetic_val_images=2",
            "data.synthetic_size=[32, 48]"]
    names = dataset_names(build_datasets(load_config(SemiConfig, None, [*data, "semi.method=supervised_only"]).data).train)
    labeled, unlabeled = write_split(tmp_path / "split", split_labeled(names, count=3, seed=0))
    config = load_config(SemiConfig, None, [
        *data, f"data.train_list={labeled}", f"semi.unlabeled_list={unlabeled}", "semi.method=unimatch",
        "data.batch_size=2", "stages.0.steps=3", "model.freeze_encoder=true",
        f"model.options={{encoder: mobilenet_v2, encoder_weights: {path}, encoder_convention: tf, "
        "decoder_channels: [16, 16, 8, 8, 8]}", f"run_dir={tmp_path / 'run'}", "device=cpu", "precision=fp32",
        "progress=false", "checkpoint_every=3"])
    result = train(config)
    assert 0 <= result.metrics["miou"] <= 1
    final = _weights(tmp_path / "run")
    encoder = [k for k in final if k.startswith("encoder.")]
    assert encoder and all(torch.equal(final[k], start[k.removeprefix("encoder.")]) for k in encoder)


def test_dense_moco_pretraining_on_the_encoder(tmp_path):
    import numpy as np
    from PIL import Image

    from labelwise.methods import pretrain
    from labelwise.methods.pretrain import PretrainConfig

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{index}.png")
    config = load_config(PretrainConfig, None, [
        f"data.images=[{tmp_path / 'images'}]", f"run_dir={tmp_path / 'run'}", "method=moco", "stages.0.steps=2",
        "backbone.kind=unet", "backbone.options={encoder: mobilenet_v2, encoder_weights: null}",
        "multicrop.global_size=64", "multicrop.local_size=32", "multicrop.local_crops=0", "moco.hidden_dim=32",
        "moco.dim=16", "moco.queue_size=16", "data.batch_size=2", "device=cpu", "progress=false"])
    result = pretrain.train(config)
    weights = load_file(str(result.backbone_path))
    assert "encoder.features.18.0.weight" in weights
    model = create("unet", num_classes=4, encoder="mobilenet_v2", encoder_weights=None)
    report = initialise_from(model, result.backbone_path, verbose=False)
    assert len(report.loaded) == len(model.encoder.state_dict())


SHARED_FILE = SHARED_WEIGHTS_DIR / "mobilenet_v2_imagenet.pth"


@pytest.mark.slow
def test_short_training_from_the_shared_imagenet_weights(tmp_path):
    if not SHARED_FILE.is_file():
        pytest.skip(f"{SHARED_FILE} not found (../shared/weights beside the project): nothing to transfer from")
    options = "model.options={encoder_weights: imagenet, decoder_channels: 64}"
    scores = {}
    for name, weights in (("imagenet", options), ("random", options.replace("imagenet", "null"))):
        config = load_config(TrainConfig, None, [
            "model.name=deeplabv3plus", "data.synthetic_train_images=32", "data.synthetic_val_images=8",
            "data.batch_size=8", "stages.0.steps=20", "stages.0.lr=0.002", "model.encoder_lr_scale=0.1", weights,
            f"run_dir={tmp_path / name}", "device=cpu", "progress=false", "checkpoint_every=20"])
        scores[name] = supervised.train(config).metrics["miou"]
    # 5 classes: predicting one class everywhere scores about 0.1; the same 20 steps from random
    # weights stay far lower than from ImageNet's
    assert scores["imagenet"] > 0.3, scores
    assert scores["imagenet"] > scores["random"] + 0.05, scores
