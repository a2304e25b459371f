"""The wide-context model (issue 27): shapes, the local branch alone equals the plain model, the
cross-attention against a literal computation, token positions by hand."""

from __future__ import annotations

import math

import pytest
import torch

from labelwise.models import create
from labelwise.models.wide_context import ContextOutput, CrossAttentionBlock, sincos_positions, token_positions

LOCAL = {"width": 8, "depth": 3}


def _model(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return create("wide_context", num_classes=4, local="unet", local_options=LOCAL, dim=16, heads=2, layers=2,
                  **options)


def test_shapes_in_training_and_evaluation_and_a_config_round_trip() -> None:
    model = _model()
    images = torch.rand(2, 6, 48, 64)
    output = model.train()(images)
    assert isinstance(output, ContextOutput)
    assert output.logits.shape == output.context_logits.shape == (2, 4, 48, 64)
    assert model.eval()(images).shape == (2, 4, 48, 64)
    rebuilt = create(**model.config())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(images), model(images))
    with pytest.raises(ValueError, match=r"images \[B, 6, H, W\]"):
        model(torch.rand(1, 3, 32, 32))


def test_the_local_branch_alone_equals_the_plain_model() -> None:
    model = _model()
    with torch.no_grad():  # a trained-looking fusion, so that switching the context off is visible
        model.from_tokens.weight.normal_(0, 0.5)
    plain = create("unet", num_classes=4, **LOCAL)
    plain.load_state_dict(model.local.state_dict())
    images = torch.rand(2, 6, 32, 32)
    model.eval()
    plain.eval()
    with_context = model(images)
    model.use_context = False
    assert torch.equal(model(images), plain(images[:, :3]))
    assert not torch.allclose(with_context, plain(images[:, :3]))
    other_context = images.clone()
    other_context[:, 3:] = torch.rand(2, 3, 32, 32)
    model.use_context = True
    assert not torch.allclose(model(other_context), with_context)  # the context is read


def test_an_untrained_fusion_starts_as_the_local_model() -> None:
    model = _model().eval()
    plain = create("unet", num_classes=4, **LOCAL).eval()
    plain.load_state_dict(model.local.state_dict())
    images = torch.rand(1, 6, 32, 32)
    assert torch.equal(model(images), plain(images[:, :3]))


def test_a_separate_context_encoder_starts_from_the_local_weights_and_trains_apart() -> None:
    model = _model(shared_encoder=False)
    local = dict(model.local.encoder.named_parameters())
    for name, param in model.context_encoder.named_parameters():
        assert torch.equal(param, local[name]) and param is not local[name]


@pytest.mark.parametrize("shared", [True, False])
def test_folded_pretrained_batchnorm_stays_frozen_in_both_encoders(shared) -> None:  # noqa: ANN001
    """The ImageNet MobileNetV2's BatchNorm is folded into its convolutions: training must keep it
    in eval mode inside a wide-context model as it does in the plain U-Net (the same default)."""
    from labelwise.config import ModelConfig
    from labelwise.models.init import configure_encoder

    options = {"encoder": "mobilenet_v2", "encoder_weights": "imagenet"}
    plain = create("unet", num_classes=3, **options)
    model = create("wide_context", num_classes=3, local="unet", local_options=options, dim=16, heads=2, layers=1,
                   shared_encoder=shared)
    assert plain.folded_batchnorm and model.folded_batchnorm
    assert configure_encoder(model, ModelConfig())["freeze_encoder_bn"] == configure_encoder(plain, ModelConfig())[
        "freeze_encoder_bn"] is True
    model.train()
    encoders = [model.local.encoder] + ([] if shared else [model.context_encoder])
    norms = [m for e in encoders for m in e.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    decoder_norms = [m for m in model.local.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert decoder_norms and all(m.training for m in decoder_norms)
    model.freeze_encoder()
    assert not any(p.requires_grad for e in encoders for p in e.parameters())


def test_cross_attention_block_equals_a_literal_computation() -> None:
    torch.manual_seed(1)
    block = CrossAttentionBlock(dim=8, heads=2).eval()
    x, context = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    expected = torch.empty(2, 5, 8)
    w_q, w_k, w_v = block.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = block.attention.in_proj_bias.chunk(3)
    for b in range(2):
        q = block.norm_query(x[b]) @ w_q.T + b_q
        kv = block.norm_context(context[b])
        k, v = kv @ w_k.T + b_k, kv @ w_v.T + b_v
        heads = []
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            weights = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(4), dim=-1)
            heads.append(weights @ v[:, s])
        attended = torch.cat(heads, dim=1) @ block.attention.out_proj.weight.T + block.attention.out_proj.bias
        y = x[b] + attended
        expected[b] = y + block.mlp(block.norm_mlp(y))
    torch.testing.assert_close(block(x, context), expected, rtol=1e-5, atol=1e-5)


def test_token_positions_place_the_window_in_the_middle_of_its_context() -> None:
    rows, cols = token_positions(4, 2, 1.0, torch.device("cpu"))
    assert rows.reshape(4, 2)[:, 0].tolist() == [0.125, 0.375, 0.625, 0.875]
    assert cols.reshape(4, 2)[0].tolist() == [0.25, 0.75]
    rows, _ = token_positions(4, 4, 3.0, torch.device("cpu"))
    assert rows.reshape(4, 4)[:, 0].tolist() == pytest.approx([-0.625, 0.125, 0.875, 1.625])
    encodings = sincos_positions(torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.0]), 8)
    assert encodings.shape == (2, 8) and torch.equal(encodings[0, 2:4], torch.ones(2))  # cos(0) = 1


# ----------------------------------------------------------------------------- data and inference


def _tiles(root, size=(40, 56), count=2):  # noqa: ANN001, ANN202
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    colours = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    labels = {}
    for t in range(1, count + 1):
        folder = root / f"tile{t}"
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
        ids = rng.integers(0, 3, size)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / "images" / "a.png")
        Image.fromarray(np.asarray(colours, np.uint8)[ids]).save(folder / "masks" / "a.png")
        labels[t] = ids
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"], "colors": ["#000000", "#FF0000",
                                                                                          "#00FF00"]}))
    return labels


def test_contexts_at_tile_borders_are_ignore_beyond_the_tile_and_labels_inside(tmp_path) -> None:  # noqa: ANN001
    import numpy as np

    from labelwise.data.aerial import AerialTiles, RandomCropDataset
    from labelwise.data.folder import resize_mask
    from labelwise.data.wide_context import WideContextCrops

    labels = _tiles(tmp_path)
    crops = RandomCropDataset(AerialTiles(tmp_path), crop_size=(16, 16), samples_per_epoch=12, seed=4)
    data = WideContextCrops(crops, 3.0)
    for index in range(12):
        tile, y, x = crops.crop_params(index)
        sample = data[index]
        assert sample["image"].shape == (6, 16, 16) and sample["context_mask"].shape == (16, 16)
        padded = np.pad(labels[tile + 1], 16 + 64, constant_values=255)  # the tile in a sea of ignore
        region = padded[y - 16 + 80: y - 16 + 80 + 48, x - 16 + 80: x - 16 + 80 + 48]
        np.testing.assert_array_equal(sample["context_mask"].numpy(), resize_mask(region, (16, 16)))
        np.testing.assert_array_equal(sample["mask"].numpy(), padded[y + 80: y + 96, x + 80: x + 96])
        outside = sample["context_mask"] == 255
        assert (sample["context_mask"][~outside] < 3).all()


def test_context_matrices_turn_each_context_about_its_windows_ground_point() -> None:
    from labelwise.config import AugmentConfig
    from labelwise.data.transforms import PairedAugment
    from labelwise.data.wide_context import context_matrices

    window = (24, 32)
    augment = PairedAugment(AugmentConfig(hflip=0.5, vflip=0.5, rotate_degrees=40, scale=(0.7, 1.4)))
    local = augment.sample_matrices(6, *window, torch.Generator().manual_seed(2))
    context = context_matrices(local, window, 3.0)
    scale = torch.tensor([3.0, 3.0], dtype=torch.float64)
    offset = torch.tensor([1.0 - 32, 1.0 - 24], dtype=torch.float64)  # window pixel p = 3 c + offset
    for b in range(6):
        for r in torch.tensor([[0.0, 0.0], [5.5, 17.0], [31.0, 23.0]], dtype=torch.float64):
            q = scale * r + offset  # the window-output pixel at context-output pixel r
            a, t = local[b, :, :2], local[b, :, 2]
            ac, tc = context[b, :, :2], context[b, :, 2]
            from_window = torch.linalg.solve(a, q - t)  # the window-input pixel the window's warp reads there
            from_context = scale * torch.linalg.solve(ac, r - tc) + offset  # the same, through the context warp
            torch.testing.assert_close(from_context, from_window)


def test_flips_turn_window_and_context_together() -> None:
    from labelwise.config import AugmentConfig
    from labelwise.data.transforms import PairedAugment
    from labelwise.data.wide_context import augment_with_context, shrink_context

    world = torch.rand(1, 3, 72, 96)
    window = world[:, :, 24:48, 32:64]
    context = shrink_context(world, (24, 32))
    images = torch.cat([window, context], dim=1)
    masks = torch.zeros(1, 24, 32, dtype=torch.long)
    augment = PairedAugment(AugmentConfig(hflip=1.0, vflip=1.0))
    out, _, _ = augment_with_context(augment, images, masks, masks.clone(), 3.0)
    flipped_world = world.flip(-1).flip(-2)
    torch.testing.assert_close(out[:, :3], flipped_world[:, :, 24:48, 32:64])
    torch.testing.assert_close(out[:, 3:], shrink_context(flipped_world, (24, 32)))


def test_sliding_window_gives_every_window_its_context() -> None:
    import torch.nn.functional as F

    from labelwise.eval.sliding_window import sliding_window_logits

    image = torch.rand(1, 3, 40, 52)
    seen = []

    def model_fn(crops: torch.Tensor) -> torch.Tensor:
        seen.append(crops.clone())
        return torch.zeros(crops.shape[0], 2, *crops.shape[-2:])

    sliding_window_logits(model_fn, image, 2, (16, 16), overlap=0.0, batch_windows=100, blend="uniform",
                          context_scale=3.0)
    crops = torch.cat(seen)
    starts_y, starts_x = [0, 16, 24], [0, 16, 32, 36]
    padded = F.pad(image, (16, 16, 16, 16))  # zero beyond the image
    index = 0
    for y in starts_y:
        for x in starts_x:
            assert torch.equal(crops[index, :3], image[0, :, y:y + 16, x:x + 16])
            region = padded[:, :, y: y + 48, x: x + 48]
            expected = F.interpolate(region, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
            torch.testing.assert_close(crops[index, 3:], expected[0])
            index += 1
    assert index == len(crops)


def test_wide_context_trains_and_evaluates_from_the_command_line(tmp_path) -> None:  # noqa: ANN001
    import json

    from labelwise.cli import main

    _tiles(tmp_path / "tiles", size=(48, 64), count=3)
    overrides = ["data.dataset=aerial", f"data.root={tmp_path / 'tiles'}", "data.train_tiles=[1, 2]",
                 "data.val_tiles=[3]", "data.tile_crop=16", "data.samples_per_epoch=8", "data.batch_size=4",
                 "model.name=wide_context",
                 "model.options={local: unet, local_options: {width: 8, depth: 2}, dim: 16, heads: 2, layers: 1}",
                 "stages=[{steps: 3, augment: {crop_size: null, hflip: 0.5, rotate_degrees: 20}}]",
                 "eval.window=16", "device=cpu", "progress=false", "eval.every=0", "log_every=1"]
    args = [arg for override in overrides for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--no-report", *args]) == 0
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [1.0, (1 - 1 / 3) ** 2, (1 - 2 / 3) ** 2]  # WiCoNet's decay, at steps 0, 1, 2
    assert [r["context_weight"] for r in logs] == pytest.approx(expected)
    assert all(r["context_loss"] > 0 for r in logs)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["miou"] >= 0
    image = tmp_path / "tiles" / "tile3" / "images" / "a.png"
    assert main(["predict", str(tmp_path / "run"), str(image), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    from PIL import Image

    with Image.open(tmp_path / "pred" / "ids" / "a.png") as ids:
        assert ids.size == (64, 48)
    assert main(["train", "--run-dir", str(tmp_path / "bad"), "--no-report", *args,
                 "--set", "stages.0.augment.crop_size=[8, 8]"]) == 2


def test_semi_methods_with_a_wide_context_model_need_unlabeled_tiles() -> None:
    from labelwise.config import load_config
    from labelwise.errors import ConfigError
    from labelwise.methods.semi import SemiConfig

    with pytest.raises(ConfigError, match=r"semi.unlabeled_tiles: a wide_context model .* semi.method fixmatch"):
        load_config(SemiConfig, None, ["model.name=wide_context", "semi.method=fixmatch",
                                       "semi.unlabeled_list=unlabeled.txt"])
    for method in ("fixmatch", "unimatch", "self_training"):
        load_config(SemiConfig, None, ["model.name=wide_context", f"semi.method={method}", "data.dataset=aerial",
                                       "data.root=x", "semi.unlabeled_tiles=[3]"])
    load_config(SemiConfig, None, ["model.name=wide_context", "semi.method=supervised_only"])


def test_the_strong_view_gives_a_context_its_windows_draws() -> None:
    from labelwise.methods.semi.perturb import strong_photometric
    from labelwise.methods.semi.steps import strong_views

    windows = torch.rand(4, 3, 12, 12)
    contexts = torch.rand(4, 3, 12, 12)
    views = strong_views(torch.cat([windows, windows], 1), torch.Generator().manual_seed(5), context_channels=3)
    torch.testing.assert_close(views[:, :3], views[:, 3:])  # same pixels, same draws: same result
    # the windows get exactly the draws strong_photometric makes alone
    alone = strong_photometric(windows, torch.Generator().manual_seed(5))
    views = strong_views(torch.cat([windows, contexts], 1), torch.Generator().manual_seed(5), context_channels=3)
    torch.testing.assert_close(views[:, :3], alone)
    # and the generator moves on as after one strong view (the rest of the step draws the same)
    after_pair, after_one = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    strong_views(torch.cat([windows, contexts], 1), after_pair, context_channels=3)
    strong_photometric(windows, after_one)
    assert torch.equal(torch.rand(3, generator=after_pair), torch.rand(3, generator=after_one))


def test_the_weak_view_moves_window_and_context_without_colour() -> None:
    from labelwise.config import AugmentConfig
    from labelwise.data.transforms import PairedAugment
    from labelwise.data.wide_context import augment_with_context

    augment = PairedAugment(AugmentConfig(crop_size=None, hflip=1.0, brightness=0.4, contrast=0.4), ignore_index=255)
    images = torch.rand(2, 6, 8, 8)
    masks = torch.randint(0, 3, (2, 8, 8))
    weak, weak_masks, _ = augment_with_context(augment, images, masks, masks.clone(), 3.0,
                                               torch.Generator().manual_seed(0), photometric=False)
    assert torch.equal(weak, images.flip(-1)) and torch.equal(weak_masks, masks.flip(-1))
    strong, _, _ = augment_with_context(augment, images, masks, masks.clone(), 3.0, torch.Generator().manual_seed(0))
    assert not torch.allclose(strong, images.flip(-1))


def test_a_semi_model_gives_the_labeled_windows_their_context_logits() -> None:
    from labelwise.methods.semi.model import SemiModel

    torch.manual_seed(0)
    student = _model()
    with torch.no_grad():  # a trained fusion, so that the context matters
        student.from_tokens.weight.normal_(0, 0.5)
    images, weak = torch.rand(2, 6, 32, 32), torch.rand(2, 6, 32, 32)
    semi = SemiModel(student).train()
    with torch.no_grad():
        outputs = semi(images, weak)
        whole = student(torch.cat([images, weak]))  # one training-mode forward of both (same BatchNorm batch)
    assert isinstance(outputs.labeled, ContextOutput)
    torch.testing.assert_close(outputs.labeled.logits, whole.logits[:2])
    torch.testing.assert_close(outputs.labeled.context_logits, whole.context_logits[:2])
    torch.testing.assert_close(outputs.weak, whole.logits[2:])


def test_relabeled_tiles_and_tile_unions_read_the_given_masks(tmp_path) -> None:  # noqa: ANN001
    import numpy as np

    from labelwise.data import AerialTiles
    from labelwise.data.tile_sources import RelabeledTiles, TileUnion
    from labelwise.errors import DataError

    labels = _tiles(tmp_path, size=(20, 24), count=3)
    labeled = AerialTiles(tmp_path, tiles=[1, 2])
    unlabeled = AerialTiles(tmp_path, tiles=[3])
    pseudo_mask = np.full((20, 24), 1, np.uint8)
    pseudo = RelabeledTiles(unlabeled, [pseudo_mask])
    image, mask = pseudo.load_pair(0)
    assert np.array_equal(mask, pseudo_mask) and not np.array_equal(mask, labels[3])
    assert np.array_equal(image, unlabeled.load_pair(0)[0])
    union = TileUnion([labeled, labeled, pseudo])
    assert len(union) == 5 and union.names == [*labeled.names, *labeled.names, *unlabeled.names]
    assert np.array_equal(union.load_pair(4)[1], pseudo_mask) and np.array_equal(union.load_mask(1), labels[2])
    assert union.image_size(4) == (20, 24) and union[2]["mask"].shape == (20, 24)
    with pytest.raises(DataError, match=r"tile3.*mask of 23x20 px for a tile of 24x20 px"):
        RelabeledTiles(unlabeled, [np.zeros((20, 23), np.uint8)])


def test_wide_self_training_repeats_labeled_tiles_to_the_pseudo_labeled_area(tmp_path) -> None:  # noqa: ANN001
    import numpy as np

    from labelwise.config import load_config
    from labelwise.data import AerialTiles, RandomCropDataset
    from labelwise.data.build import build_datasets
    from labelwise.methods.semi import SemiConfig
    from labelwise.methods.semi.train import _pseudo_labeled_tiles

    _tiles(tmp_path, size=(20, 24), count=4)
    config = load_config(SemiConfig, None, ["data.dataset=aerial", f"data.root={tmp_path}", "data.train_tiles=[1]",
                                            "data.val_tiles=[1]", "data.tile_crop=8", "data.samples_per_epoch=5",
                                            "semi.method=self_training", "semi.unlabeled_tiles=[2, 3, 4]"])
    splits = build_datasets(config.data)
    unlabeled = AerialTiles(tmp_path, tiles=[2, 3, 4])
    masks = [np.full((20, 24), k, np.uint8) for k in range(3)]
    round_splits = _pseudo_labeled_tiles(config, splits, unlabeled, masks)
    union = round_splits.train_source
    assert union.names == ["tile1_a"] * 3 + ["tile2_a", "tile3_a", "tile4_a"]  # 3 x the labeled area
    assert [int(union.load_mask(i)[0, 0]) for i in range(3, 6)] == [0, 1, 2]
    assert isinstance(round_splits.train, RandomCropDataset) and len(round_splits.train) == 10


@pytest.mark.parametrize("method", ["fixmatch", "unimatch", "self_training"])
def test_semi_methods_train_a_wide_context_model_from_the_command_line(tmp_path, method) -> None:  # noqa: ANN001
    import json

    from labelwise.cli import main

    _tiles(tmp_path / "tiles", size=(48, 64), count=4)
    overrides = ["data.dataset=aerial", f"data.root={tmp_path / 'tiles'}", "data.train_tiles=[1, 2]",
                 "data.val_tiles=[4]", "data.tile_crop=16", "data.samples_per_epoch=8", "data.batch_size=4",
                 "semi.unlabeled_tiles=[3]", "semi.threshold=0.0", "semi.self_training_threshold=0.0",
                 "model.name=wide_context",
                 "model.options={local: unet, local_options: {width: 8, depth: 2}, dim: 16, heads: 2, layers: 1}",
                 "stages=[{steps: 3, augment: {crop_size: null, hflip: 0.5, rotate_degrees: 20}}]",
                 "eval.window=16", "progress=false", "eval.every=0", "log_every=1"]
    args = [arg for override in overrides for arg in ("--set", override)]
    run = tmp_path / "run"
    assert main(["semi", "train", "--method", method, "--device", "cpu", "--run-dir", str(run), *args]) == 0
    assert json.loads((run / "eval.json").read_text())["miou"] >= 0
    if method == "self_training":  # round 1 pseudo-labels the whole unlabeled tile, every window with its context
        rounds = json.loads((run / "self_training.json").read_text())["rounds"]
        assert rounds[1]["pseudo_labeled_images"] == 1 and rounds[1]["confident_fraction"] == 1.0
        logs = [json.loads(line) for line in (run / "round1" / "metrics.jsonl").read_text().splitlines()]
    else:
        logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(0.0 <= r["confident"] <= 1.0 for r in logs)
    assert [r["context_weight"] for r in logs] == pytest.approx([1.0, (1 - 1 / 3) ** 2, (1 - 2 / 3) ** 2])
    assert all(r["context_loss"] > 0 for r in logs)
