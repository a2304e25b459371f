"""Reading images and label masks: encodings, the palette rule, and error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelwise.data.classmap import ClassMap
from labelwise.data.io import image_size, pack_rgb, read_image, read_label
from labelwise.errors import DataError

COLORS = ((60, 16, 152), (132, 41, 246), (110, 193, 228))


@pytest.fixture()
def color_map() -> ClassMap:
    return ClassMap(("building", "land", "road"), COLORS, ignore_colors=((0, 0, 0),))


@pytest.fixture()
def id_map() -> ClassMap:
    return ClassMap.from_dict({"classes": [f"c{i}" for i in range(11)], "ignore_index": 11})


def _noise_image(height: int = 64, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_read_image_converts_to_rgb(tmp_path: Path, mode: str) -> None:
    rgb = _noise_image()
    path = tmp_path / f"img_{mode}.png"
    Image.fromarray(rgb).convert(mode).save(path)
    out = read_image(path)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.asarray(Image.fromarray(rgb).convert(mode).convert("RGB")))
    if mode == "RGB":
        assert np.array_equal(out, rgb)
    assert image_size(path) == (64, 80)


def test_read_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.jpg: file not found"):
        read_image(tmp_path / "nothere.jpg")


def test_read_image_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(DataError) as info:
        read_image(path)
    assert "garbage.jpg" in str(info.value)
    assert "not a readable image" in str(info.value)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_read_image_truncated(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(_noise_image(128, 128)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        read_image(path)
    message = str(info.value)
    assert f"cut{suffix}" in message
    assert "truncated or corrupt" in message


# ----------------------------------------------------------------------------- class-id masks


def test_read_label_ids_and_ignore_values(tmp_path: Path, id_map: ClassMap) -> None:
    values = np.array([[0, 1, 10], [11, 255, 5]], dtype=np.uint8)
    path = tmp_path / "ids.png"
    Image.fromarray(values, mode="L").save(path)
    out = read_label(path, id_map)
    assert out.dtype == np.int64
    assert out.tolist() == [[0, 1, 10], [255, 255, 5]]


def test_read_label_invalid_id_names_file_value_and_count(tmp_path: Path, id_map: ClassMap) -> None:
    values = np.zeros((10, 10), dtype=np.uint8)
    values[0, :7] = 12
    values[5, 0] = 200
    path = tmp_path / "bad_ids.png"
    Image.fromarray(values, mode="L").save(path)
    with pytest.raises(DataError) as info:
        read_label(path, id_map)
    message = str(info.value)
    assert "bad_ids.png" in message
    assert "12 (7 px)" in message and "200 (1 px)" in message
    assert "num_classes 11" in message


def test_read_label_16bit_ids(tmp_path: Path, id_map: ClassMap) -> None:
    values = np.array([[0, 3], [255, 9]], dtype=np.uint16)
    path = tmp_path / "ids16.png"
    Image.fromarray(values).save(path)
    assert read_label(path, id_map).tolist() == [[0, 3], [255, 9]]
    Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(path)
    with pytest.raises(DataError, match=r"ids16\.png: invalid class id\(s\) 300 \(1 px\)"):
        read_label(path, id_map)


# ----------------------------------------------------------------------------- color masks


def _color_mask(labels: np.ndarray, colors: tuple) -> np.ndarray:
    table = np.asarray(list(colors) + [(0, 0, 0)], dtype=np.uint8)
    return table[np.where(labels == 255, len(colors), labels)]


@pytest.mark.parametrize("size", [(6, 7), (90, 100)])  # small: binary search; large: table lookup
def test_read_label_rgb_colors(tmp_path: Path, color_map: ClassMap, size: tuple[int, int]) -> None:
    labels = np.random.default_rng(1).choice([0, 1, 2, 255], size=size)
    path = tmp_path / "rgb.png"
    Image.fromarray(_color_mask(labels, COLORS)).save(path)
    assert np.array_equal(read_label(path, color_map), labels)


@pytest.mark.parametrize("size", [(6, 7), (90, 100)])
def test_read_label_unknown_color_names_hex_and_count(tmp_path: Path, color_map: ClassMap, size: tuple[int, int]) -> None:
    rgb = _color_mask(np.zeros(size, dtype=np.int64), COLORS)
    rgb[0, :3] = (10, 11, 12)
    rgb[1, 0] = (255, 255, 255)
    path = tmp_path / "odd_color.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(DataError) as info:
        read_label(path, color_map)
    message = str(info.value)
    assert "odd_color.png" in message
    assert "#0A0B0C (3 px)" in message and "#FFFFFF (1 px)" in message
    assert "unknown color" in message


def test_read_label_rgba_drops_alpha(tmp_path: Path, color_map: ClassMap) -> None:
    labels = np.array([[0, 1], [2, 255]])
    rgba = np.concatenate([_color_mask(labels, COLORS), np.full((2, 2, 1), 128, np.uint8)], axis=2)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    assert read_label(path, color_map).tolist() == labels.tolist()


def _palette_png(path: Path, indices: np.ndarray, palette: list[tuple[int, int, int]]) -> None:
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    flat = [v for color in palette for v in color]
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)


def test_palette_png_with_class_colors_is_color_coded(tmp_path: Path, color_map: ClassMap) -> None:
    # palette order differs from class order: index 0 → road, 1 → black (ignore), 2 → building
    indices = np.array([[0, 1, 2], [2, 2, 0]])
    path = tmp_path / "pal.png"
    _palette_png(path, indices, [COLORS[2], (0, 0, 0), COLORS[0]])
    assert read_label(path, color_map).tolist() == [[2, 255, 0], [0, 0, 2]]


def test_palette_png_with_other_palette_is_class_ids(tmp_path: Path, color_map: ClassMap) -> None:
    indices = np.array([[0, 1, 2], [2, 1, 0]])
    path = tmp_path / "voc.png"
    _palette_png(path, indices, [(0, 0, 0), (128, 0, 0), (0, 128, 0)])  # VOC-style palette
    assert read_label(path, color_map).tolist() == indices.tolist()


def test_palette_png_mostly_class_colors_reports_stray_color(tmp_path: Path, color_map: ClassMap) -> None:
    indices = np.full((10, 10), 5)
    indices[0, 0] = 7  # one stray palette entry that is no class color
    path = tmp_path / "stray.png"
    palette = [(1, 1, 1)] * 5 + [COLORS[1], (1, 1, 1), (9, 9, 9)]
    _palette_png(path, indices, palette)
    with pytest.raises(DataError, match=r"stray\.png: unknown color\(s\) #090909 \(1 px\)"):
        read_label(path, color_map)


def test_read_label_corrupt_mask(tmp_path: Path, color_map: ClassMap) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError, match="broken.png"):
        read_label(path, color_map)


def test_pack_rgb() -> None:
    assert int(pack_rgb(np.array([0x3C, 0x10, 0x98], dtype=np.uint8))) == 0x3C1098
