"""The ISPRS Potsdam / Vaihingen layout, on tiles the tests write (no real ISPRS data here).

Reference: the class-id arrays the tiles were written from, encoded with the benchmark's
published colours by a literal lookup here, not by labelwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelwise.data.aerial import RandomCropDataset
from labelwise.data.isprs import ISPRS_CLASSES, IsprsTiles, discover_isprs
from labelwise.errors import DataError

COLOURS = {0: (255, 255, 255), 1: (0, 0, 255), 2: (0, 255, 255), 3: (0, 255, 0), 4: (255, 255, 0), 5: (255, 0, 0)}


def _encode(ids: np.ndarray, boundary: np.ndarray | None = None) -> np.ndarray:
    rgb = np.zeros((*ids.shape, 3), np.uint8)
    for row in range(ids.shape[0]):
        for col in range(ids.shape[1]):
            rgb[row, col] = (0, 0, 0) if boundary is not None and boundary[row, col] else COLOURS[int(ids[row, col])]
    return rgb


def _boundary(ids: np.ndarray) -> np.ndarray:
    edge = np.zeros(ids.shape, bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    return edge


def _potsdam(root: Path, tile_ids: list[str], size: tuple[int, int] = (20, 28)) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    written = {}
    for tile_id in tile_ids:
        ids = np.repeat(np.repeat(rng.integers(0, 6, (size[0] // 4, size[1] // 4)), 4, axis=0), 4, axis=1)
        rgbir = rng.integers(0, 255, (*size, 4), dtype=np.uint8)
        for folder, name, array in (("2_Ortho_RGB", "RGB", rgbir[..., :3]), ("4_Ortho_RGBIR", "RGBIR", rgbir)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / f"top_potsdam_{tile_id}_{name}.tif")
        (root / "5_Labels_all").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_encode(ids)).save(root / "5_Labels_all" / f"top_potsdam_{tile_id}_label.tif")
        (root / "5_Labels_all_noBoundary").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_encode(ids, _boundary(ids))).save(
            root / "5_Labels_all_noBoundary" / f"top_potsdam_{tile_id}_label_noBoundary.tif")
        written[tile_id] = {"ids": ids, "rgbir": rgbir}
    return written


def test_potsdam_tiles_round_trip_labels_bands_and_eroded_masks(tmp_path: Path) -> None:
    written = _potsdam(tmp_path, ["2_10", "2_11", "3_10"])
    layout, tiles = discover_isprs(tmp_path)
    assert layout == "potsdam" and sorted(tiles) == ["2_10", "2_11", "3_10"]
    data = IsprsTiles(tmp_path, tiles=["2_11", "3_10"])
    assert data.names == ["2_11", "3_10"] and data.class_map == ISPRS_CLASSES and data.bands == "RGB"
    for index, tile_id in enumerate(data.names):
        image, mask = data.load_pair(index)
        np.testing.assert_array_equal(mask, written[tile_id]["ids"])
        np.testing.assert_array_equal(image, written[tile_id]["rgbir"][..., :3])
    eroded = IsprsTiles(tmp_path, tiles=["2_10"], eroded=True, bands="RGBIR")
    image, mask = eroded.load_pair(0)
    ids = written["2_10"]["ids"]
    expected = np.where(_boundary(ids), 255, ids)
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(image, written["2_10"]["rgbir"])
    sample = eroded[0]
    assert sample["image"].shape == (4, 20, 28) and sample["name"] == "2_10"


def test_four_band_crops_pad_with_zero_and_ignore(tmp_path: Path) -> None:
    written = _potsdam(tmp_path, ["2_10"], size=(12, 16))
    crops = RandomCropDataset(IsprsTiles(tmp_path, bands="RGBIR"), crop_size=(20, 24), samples_per_epoch=4, seed=1)
    for index in range(4):
        tile, y, x = crops.crop_params(index)
        image, mask = crops.crop(tile, y, x)
        inside = crops.inside(index)
        assert image.shape == (20, 24, 4) and (image[~inside] == 0).all() and (mask[~inside] == 255).all()
        rows, cols = np.nonzero(inside)
        np.testing.assert_array_equal(image[inside].reshape(12, 16, 4), written["2_10"]["rgbir"])
        assert rows.min() == -y and cols.min() == -x


def test_vaihingen_layout_tells_images_from_labels_by_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 6, (8, 12))
    for area in (1, 3):
        (tmp_path / "top").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)).save(
            tmp_path / "top" / f"top_mosaic_09cm_area{area}.tif")
        (tmp_path / "gts_for_participants").mkdir(exist_ok=True)
        Image.fromarray(_encode(ids)).save(tmp_path / "gts_for_participants" / f"top_mosaic_09cm_area{area}.tif")
    layout, tiles = discover_isprs(tmp_path)
    assert layout == "vaihingen" and tiles["3"].label is not None and "IRRG" in tiles["3"].images
    data = IsprsTiles(tmp_path, tiles=[3])
    assert data.bands == "IRRG" and data.names == ["3"]
    np.testing.assert_array_equal(data.load_pair(0)[1], ids)


def test_isprs_errors_name_the_file_or_the_choices(tmp_path: Path) -> None:
    _potsdam(tmp_path, ["2_10"])
    with pytest.raises(DataError, match=r"no potsdam tile\(s\) \['9_9'\]; available: \['2_10'\]"):
        IsprsTiles(tmp_path, tiles=["9_9"])
    with pytest.raises(DataError, match="bands must be one of"):
        IsprsTiles(tmp_path, bands="NIR")
    bad = tmp_path / "5_Labels_all" / "top_potsdam_2_10_label.tif"
    colours = np.asarray(Image.open(bad)).copy()
    colours[0, 0] = (12, 34, 56)
    Image.fromarray(colours).save(bad)
    with pytest.raises(DataError, match=r"top_potsdam_2_10_label\.tif: unknown color\(s\) #0C2238 \(1 px\)"):
        IsprsTiles(tmp_path)
    (tmp_path / "top_mosaic_09cm_area1.tif").write_bytes(b"")
    with pytest.raises(DataError, match="both Potsdam and Vaihingen"):
        discover_isprs(tmp_path)
    with pytest.raises(DataError, match="ISPRS dataset folder not found"):
        discover_isprs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no ISPRS tiles"):
        discover_isprs(tmp_path / "empty")


def test_isprs_config_trains_on_full_labels_and_evaluates_on_eroded_ones(tmp_path: Path) -> None:
    from labelwise.cli import main
    from labelwise.config import DataConfig
    from labelwise.data.build import build_datasets

    written = _potsdam(tmp_path / "potsdam", ["2_10", "2_11", "3_10"], size=(24, 32))
    data = DataConfig(dataset="isprs", root=str(tmp_path / "potsdam"), train_tiles=["2_10", "2_11"],
                      val_tiles=["3_10"], tile_crop=16, samples_per_epoch=8, batch_size=4)
    splits = build_datasets(data)
    ids = written["3_10"]["ids"]
    np.testing.assert_array_equal(splits.val[0]["mask"].numpy(), np.where(_boundary(ids), 255, ids))
    np.testing.assert_array_equal(splits.train_source.load_pair(0)[1], written["2_10"]["ids"])  # full labels
    overrides = ["data.dataset=isprs", f"data.root={tmp_path / 'potsdam'}", "data.train_tiles=['2_10', '2_11']",
                 "data.val_tiles=['3_10']", "data.tile_crop=16", "data.samples_per_epoch=8", "data.batch_size=4",
                 "stages=[{steps: 2, augment: {crop_size: null}}]", "model.options={width: 8, depth: 2}",
                 "device=cpu", "progress=false", "eval.every=0"]
    args = [arg for override in overrides for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--no-report", *args]) == 0
    assert (tmp_path / "run" / "eval.json").is_file()
    four = ["--set", "data.bands=RGBIR"]
    assert main(["train", "--run-dir", str(tmp_path / "run3"), *args, *four, "--set", "model.options.in_channels=3",
                 "--no-report"]) == 2
    assert main(["train", "--run-dir", str(tmp_path / "run4"), *args, *four]) == 0  # its report too
    info = json.loads((tmp_path / "run4" / "model.json").read_text())
    assert info["architecture"]["in_channels"] == 4 and (tmp_path / "run4" / "report.html").is_file()
    tile = tmp_path / "potsdam" / "4_Ortho_RGBIR" / "top_potsdam_3_10_RGBIR.tif"
    assert main(["predict", str(tmp_path / "run4"), str(tile), "--out", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    with Image.open(tmp_path / "pred" / "ids" / f"{tile.stem}.png") as ids_png:
        assert ids_png.size == (32, 24)
    overlay = np.asarray(Image.open(tmp_path / "pred" / "overlay" / f"{tile.stem}.png"))
    assert overlay.shape == (24, 32, 3)


def test_wide_context_on_four_band_tiles_supervised_and_semi_supervised(tmp_path: Path) -> None:
    """A wide-context model reads RGBIR windows with RGBIR contexts ([B, 8, h, w]): trained by
    ``train`` and by ``semi train`` (FixMatch on an unlabeled tile), then ``predict`` on a tile."""
    from labelwise.cli import main

    _potsdam(tmp_path / "potsdam", ["2_10", "2_11", "3_10"], size=(24, 32))
    overrides = ["data.dataset=isprs", f"data.root={tmp_path / 'potsdam'}", "data.train_tiles=['2_10']",
                 "data.val_tiles=['3_10']", "data.tile_crop=16", "data.samples_per_epoch=4", "data.batch_size=2",
                 "data.bands=RGBIR", "stages=[{steps: 2, augment: {crop_size: null, hflip: 0.5}}]",
                 "model.name=wide_context",
                 "model.options={local: unet, local_options: {width: 8, depth: 2}, dim: 16, heads: 2, layers: 1}",
                 "eval.window=16", "device=cpu", "progress=false", "eval.every=0"]
    args = [arg for override in overrides for arg in ("--set", override)]
    assert main(["train", "--run-dir", str(tmp_path / "sup"), "--no-report", *args]) == 0
    assert main(["semi", "train", "--method", "fixmatch", "--run-dir", str(tmp_path / "semi"), *args,
                 "--set", "semi.unlabeled_tiles=['2_11']"]) == 0
    for run in ("sup", "semi"):
        info = json.loads((tmp_path / run / "model.json").read_text())
        assert info["architecture"]["in_channels"] == 4 and info["architecture"]["name"] == "wide_context"
        tile = tmp_path / "potsdam" / "4_Ortho_RGBIR" / "top_potsdam_3_10_RGBIR.tif"
        assert main(["predict", str(tmp_path / run), str(tile), "--out", str(tmp_path / f"pred_{run}"),
                     "--device", "cpu"]) == 0
        with Image.open(tmp_path / f"pred_{run}" / "ids" / f"{tile.stem}.png") as ids_png:
            assert ids_png.size == (32, 24)


def test_colour_augmentation_acts_on_the_first_three_bands_only() -> None:
    import torch

    from labelwise.config import AugmentConfig
    from labelwise.data.transforms import PairedAugment
    from labelwise.methods.semi.perturb import strong_photometric

    images = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    augment = PairedAugment(AugmentConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1))
    for transform in (augment.photometric, strong_photometric):
        four = transform(images, torch.Generator().manual_seed(5))
        three = transform(images[:, :3].clone(), torch.Generator().manual_seed(5))
        assert torch.equal(four[:, 3], images[:, 3]) and torch.equal(four[:, :3], three)
        assert not torch.equal(three, images[:, :3])
