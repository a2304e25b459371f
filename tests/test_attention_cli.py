"""Attention figures: maps vs an independent recomputation, the PNGs, and `labelwise attention`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from labelwise.cli import build_parser, main
from labelwise.models.vit import create_vit
from labelwise.models.vit_loading import save_vit
from labelwise.report.attention import attention_maps, colormap, colormap_table, save_attention_pngs


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = create_vit("vit_tiny", patch_size=8, embed_dim=48, depth=2, num_heads=3, num_registers=2)
    with torch.no_grad():  # a less uniform attention than the initialisation gives
        for block in model.blocks:
            block.attn.qkv.weight.mul_(20)
    return model.eval()


def expected_maps(vit, image: torch.Tensor, block: int) -> np.ndarray:
    """cls -> patch attention from the raw attention tensor, repeated over each patch's pixels."""
    with torch.no_grad():
        attn = vit(image[None], return_attention=(block,)).attentions[block % vit.depth][0].numpy()
    height, width = image.shape[-2:]
    h, w = -(-height // 8), -(-width // 8)
    cls = attn[:, 0, 1 + 2:].reshape(3, h, w)  # skip the class token and the 2 registers
    return np.repeat(np.repeat(cls, 8, axis=1), 8, axis=2)[:, :height, :width]


def test_attention_maps_equal_recomputation(vit):
    image = torch.rand(3, 37, 50)
    for block in (-1, 0):
        maps = attention_maps(vit, image, block)
        assert maps.shape == (3, 37, 50)
        np.testing.assert_allclose(maps.numpy(), expected_maps(vit, image, block), rtol=1e-5, atol=1e-7)
    assert not np.allclose(attention_maps(vit, image, 0).numpy(), attention_maps(vit, image, 1).numpy())


def test_pngs_count_size_and_values(vit, tmp_path):
    image = torch.rand(3, 37, 50)
    maps = attention_maps(vit, image)
    paths = save_attention_pngs(maps, image, tmp_path / "fig")
    assert [p.name for p in paths] == ["head_00.png", "head_01.png", "head_02.png", "mean.png", "overlay.png"]
    expected = expected_maps(vit, image, -1)

    def normalised(values):
        return (values - values.min()) / (values.max() - values.min())

    for head in range(3):
        png = np.asarray(Image.open(paths[head]))
        assert png.shape == (37, 50, 3)
        np.testing.assert_array_equal(png, colormap(normalised(expected[head])))
    mean_png = np.asarray(Image.open(paths[3]))
    np.testing.assert_array_equal(mean_png, colormap(normalised(expected.mean(0))))
    rgb = np.clip(image.permute(1, 2, 0).numpy() * 255 + 0.5, 0, 255).astype(np.uint8)
    blended = np.clip(0.5 * rgb + 0.5 * mean_png.astype(np.float64) + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_allclose(np.asarray(Image.open(paths[4])).astype(int), blended.astype(int), atol=1)


def test_colormap_table():
    table = colormap_table()
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert table[0].tolist() == [68, 1, 84] and table[255].tolist() == [253, 231, 37]
    assert colormap(np.array([0.0, 2.0, -1.0, 1.0])).tolist() == [[68, 1, 84], [253, 231, 37]] * 2
    luminance = table @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luminance) > -1.0)  # (nearly) monotone: dark = low attention


def test_cli_attention(vit, tmp_path, capsys):
    backbone = save_vit(vit, tmp_path / "vit.safetensors")
    first, second = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(first)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(second)
    out = tmp_path / "out"
    assert main(["attention", str(first), str(second), "--backbone", str(backbone), "--out", str(out),
                 "--size", "0", "--device", "cpu"]) == 0
    assert "wrote 10 attention PNG(s) for 2 image(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "a").iterdir()) == [
        "head_00.png", "head_01.png", "head_02.png", "mean.png", "overlay.png"]
    assert Image.open(out / "a" / "mean.png").size == (44, 30)
    assert Image.open(out / "b" / "overlay.png").size == (40, 60)

    assert main(["attention", str(second), "--backbone", str(backbone), "--out", str(out / "s"), "--size", "24",
                 "--block", "0"]) == 0
    assert Image.open(out / "s" / "b" / "head_02.png").size == (24, 36)  # shorter side 24

    assert main(["attention", str(first), "--backbone", str(backbone), "--out", str(out), "--block", "5"]) == 2
    assert "block 5 is out of range" in capsys.readouterr().err
    assert main(["attention", str(tmp_path / "missing.png"), "--backbone", str(backbone)]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["attention", str(first), "--backbone", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["attention", "train"])
def test_help_lists_new_options(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # noqa: SLF001
    for action in sub._actions:  # noqa: SLF001
        if action.option_strings and action.dest != "help":
            assert action.help and any(opt in text for opt in action.option_strings)
    assert ("--init" in text) if command == "train" else ("--block" in text and "--size" in text)
