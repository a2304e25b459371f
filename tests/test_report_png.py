"""PNG writers: id maps keep their values and one bit depth per output; bad ids are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelwise.data.classmap import ClassMap
from labelwise.report import write_id_png, write_prediction_pngs


def test_id_png_round_trips_values_and_picks_the_depth_from_max_id(tmp_path: Path) -> None:
    ids = np.array([[0, 3], [255, 7]])
    write_id_png(ids, tmp_path / "small.png", max_id=255)
    small = Image.open(tmp_path / "small.png")
    assert small.mode == "L"
    np.testing.assert_array_equal(np.asarray(small), ids)
    # the same values in a file set that may hold ids above 255: 16-bit
    write_id_png(ids, tmp_path / "wide.png", max_id=300)
    wide = Image.open(tmp_path / "wide.png")
    assert wide.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(wide), ids)
    write_id_png(np.array([[299, 0]]), tmp_path / "wide2.png", max_id=300)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "wide2.png")), [[299, 0]])


@pytest.mark.parametrize("ids, max_id", [(np.array([[256]]), 255), (np.array([[-1]]), 10), (np.array([[0]]), 70000)])
def test_id_png_refuses_ids_that_would_wrap(tmp_path: Path, ids: np.ndarray, max_id: int) -> None:
    with pytest.raises(ValueError, match="bad.png"):
        write_id_png(ids, tmp_path / "bad.png", max_id=max_id)
    assert not (tmp_path / "bad.png").exists()


def test_prediction_pngs_write_ids_colors_and_overlay(tmp_path: Path) -> None:
    class_map = ClassMap.from_names(["a", "b", "c"])
    prediction = np.array([[0, 1], [2, 1]])
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    paths = write_prediction_pngs(prediction, image, class_map, tmp_path, "x", alpha=0.5)
    np.testing.assert_array_equal(np.asarray(Image.open(paths["ids"])), prediction)
    colors = np.asarray(Image.open(paths["color"]))
    np.testing.assert_array_equal(colors, class_map.colorize(prediction))
    expected = np.clip(0.5 * 100 + 0.5 * colors.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(paths["overlay"])), expected)
