"""Folder, CamVid, aerial-tile, random-crop and synthetic datasets; collate; the factory."""

from __future__ import annotations

import json
import pickle
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelwise.data import (
    AerialTiles,
    CamVid,
    ClassMap,
    FolderDataset,
    RandomCropDataset,
    SyntheticShapes,
    build_dataset,
    pad_collate,
)
from labelwise.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
COLORS = ((60, 16, 152), (132, 41, 246), (110, 193, 228))


def _ids_map(num_classes: int = 4) -> ClassMap:
    return ClassMap.from_names([f"c{i}" for i in range(num_classes)])


def _write_pair(root: Path, stem: str, size: tuple[int, int] = (20, 30), seed: int = 0, mask_dir: str = "labels") -> np.ndarray:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / mask_dir).mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, size).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask, mode="L").save(root / mask_dir / f"{stem}.png")
    return mask


def _make_folder(root: Path, count: int = 3, **kwargs) -> list[np.ndarray]:
    return [_write_pair(root, f"img{i}", seed=i, **kwargs) for i in range(count)]


# ----------------------------------------------------------------------------- FolderDataset


def test_folder_dataset_samples(tmp_path: Path) -> None:
    masks = _make_folder(tmp_path, 3)
    ds = FolderDataset(tmp_path, _ids_map())
    assert len(ds) == 3
    sample = ds[1]
    assert sample["name"] == "img1"
    assert sample["image"].shape == (3, 20, 30) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert sample["mask"].dtype == torch.int64
    assert np.array_equal(sample["mask"].numpy(), masks[1])
    labels = ds.image_labels(1)
    assert labels.tolist() == [float(c in masks[1]) for c in range(4)]


def test_folder_dataset_masks_folder_resize_and_classes_json(tmp_path: Path) -> None:
    _make_folder(tmp_path, 2, mask_dir="masks")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c", "d"]}))
    ds = FolderDataset(tmp_path, resize=(10, 15))
    assert ds.class_map.names == ("a", "b", "c", "d")
    sample = ds[0]
    assert sample["image"].shape == (3, 10, 15) and sample["mask"].shape == (10, 15)
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 2, 3}


def test_folder_dataset_without_class_map_or_json(tmp_path: Path) -> None:
    _make_folder(tmp_path, 1)
    with pytest.raises(DataError, match="no classes.json"):
        FolderDataset(tmp_path)


def test_empty_images_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match=r"images.*folder is empty"):
        FolderDataset(tmp_path, _ids_map())


def test_missing_images_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no images folder"):
        FolderDataset(tmp_path, _ids_map())


def test_image_without_mask(tmp_path: Path) -> None:
    _make_folder(tmp_path, 2)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "lonely.jpg")
    with pytest.raises(DataError) as info:
        FolderDataset(tmp_path, _ids_map())
    assert "lonely.jpg" in str(info.value) and "has no mask" in str(info.value)


def test_mask_without_image(tmp_path: Path) -> None:
    _make_folder(tmp_path, 2)
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "labels" / "orphan.png")
    with pytest.raises(DataError) as info:
        FolderDataset(tmp_path, _ids_map())
    assert "orphan.png" in str(info.value) and "has no image" in str(info.value)


def test_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    _make_folder(tmp_path, 1)
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(tmp_path / "labels" / "img0.png")
    with pytest.raises(DataError) as info:
        FolderDataset(tmp_path, _ids_map())
    message = str(info.value)
    assert "img0.png" in message and "size mismatch" in message
    assert "30x20" in message and "30x21" in message


def test_preflight_finds_bad_files_at_construction_and_load_still_checks(tmp_path: Path) -> None:
    _make_folder(tmp_path, 2)
    Image.fromarray(np.full((20, 30), 9, np.uint8)).save(tmp_path / "labels" / "img1.png")
    (tmp_path / "images" / "img0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"img0\.png.*\(and 1 more problem\(s\)\).*on_error=skip"):
        FolderDataset(tmp_path, _ids_map())  # every file is checked before anything is trained
    _write_pair(tmp_path, "img0")
    with pytest.raises(DataError, match=r"img1\.png: invalid class id\(s\) 9 \(600 px\)"):
        FolderDataset(tmp_path, _ids_map())  # label values are part of the pre-flight check
    _write_pair(tmp_path, "img1")
    ds = FolderDataset(tmp_path, _ids_map())
    Image.fromarray(np.full((20, 30), 9, np.uint8)).save(tmp_path / "labels" / "img1.png")  # changed after
    with pytest.raises(DataError) as info:
        ds[1]
    assert "img1.png" in str(info.value) and "9 (600 px)" in str(info.value)
    problems = ds.validate()
    assert len(problems) == 1 and "img1.png" in problems[0]


def test_on_error_skip_drops_exactly_the_bad_ones(tmp_path: Path) -> None:
    _make_folder(tmp_path, 6)
    (tmp_path / "images" / "img1.png").write_bytes(b"not an image")  # unreadable image
    Image.fromarray(np.zeros((25, 30), np.uint8)).save(tmp_path / "labels" / "img2.png")  # size mismatch
    Image.fromarray(np.full((20, 30), 7, np.uint8)).save(tmp_path / "labels" / "img3.png")  # invalid id
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "images" / "nomask.jpg")  # no mask
    with pytest.warns(UserWarning) as record:
        ds = FolderDataset(tmp_path, _ids_map(), on_error="skip")
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 4" in message
    for kind in ("1 unreadable image", "1 size mismatch", "1 invalid label", "1 image without mask"):
        assert kind in message
    assert ds.names == ["img0", "img4", "img5"]
    assert [ds[i]["name"] for i in range(len(ds))] == ["img0", "img4", "img5"]


def test_on_error_skip_without_problems_is_silent(tmp_path: Path) -> None:
    _make_folder(tmp_path, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(FolderDataset(tmp_path, _ids_map(), on_error="skip")) == 2


# ----------------------------------------------------------------------------- CamVid layout


def test_camvid_layout_on_tmp(tmp_path: Path) -> None:
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(11)], "ignore_index": 11}))
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "labels").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "train" / "images" / "a.jpg")
    Image.fromarray(np.array([[11, 10, 0, 1, 2, 3]] * 4, np.uint8), mode="L").save(tmp_path / "train" / "labels" / "a.png")
    ds = CamVid(tmp_path, "train")
    assert ds[0]["mask"][0].tolist() == [255, 10, 0, 1, 2, 3]
    with pytest.raises(DataError, match=r"split 'val' not found; available splits: \['train'\]"):
        CamVid(tmp_path, "val")


# ----------------------------------------------------------------------------- aerial tiles


def _write_tile(root: Path, tile: str, stem: str, size: tuple[int, int], seed: int, palette: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    (root / tile / "images").mkdir(parents=True, exist_ok=True)
    (root / tile / "masks").mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, 3, size)
    labels[0, 0] = 255
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / tile / "images" / f"{stem}.png")
    table = np.asarray(list(COLORS) + [(0, 0, 0)], dtype=np.uint8)
    rgb = table[np.where(labels == 255, 3, labels)]
    img = Image.fromarray(rgb)
    if palette:
        img = img.quantize(palette=_palette_image(table))
    img.save(root / tile / "masks" / f"{stem}.png")
    return labels


def _palette_image(table: np.ndarray) -> Image.Image:
    pal = Image.new("P", (1, 1))
    pal.putpalette(table.reshape(-1).tolist() + [0] * (768 - table.size))
    return pal


@pytest.fixture()
def aerial_root(tmp_path: Path) -> Path:
    root = tmp_path / "aerial"
    root.mkdir()
    (root / "classes.json").write_text(
        json.dumps({"classes": ["building", "land", "road"], "colors": ["#3C1098", "#8429F6", "#6EC1E4"], "ignore_colors": ["#000000"]})
    )
    _write_tile(root, "tile1", "part_001", (40, 60), 0)
    _write_tile(root, "tile1", "part_002", (20, 20), 1, palette=True)
    _write_tile(root, "tile2", "part_001", (100, 30), 2)
    return root


def test_aerial_tiles(aerial_root: Path) -> None:
    tiles = AerialTiles(aerial_root)
    assert len(tiles) == 3
    assert tiles.names == ["tile1_part_001", "tile1_part_002", "tile2_part_001"]
    assert tiles.pairs[2][0].parent.parent.name == "tile2"
    sample = tiles[1]
    assert sample["image"].shape == (3, 20, 20)
    assert sample["mask"][0, 0] == 255
    assert set(sample["mask"].unique().tolist()) <= {0, 1, 2, 255}
    assert len(AerialTiles(aerial_root, tiles=[2])) == 1
    assert len(AerialTiles(aerial_root, tiles=["tile1"])) == 2
    with pytest.raises(DataError, match=r"tile9.*available: \['tile1', 'tile2'\]"):
        AerialTiles(aerial_root, tiles=[9])


def test_random_crops_are_deterministic(aerial_root: Path) -> None:
    crops = RandomCropDataset(AerialTiles(aerial_root), crop_size=16, samples_per_epoch=12, seed=3)
    first = [crops[i] for i in range(12)]
    other_worker = pickle.loads(pickle.dumps(crops))  # what a spawned DataLoader worker gets
    for i in reversed(range(12)):
        again = other_worker[i]
        assert again["name"] == first[i]["name"]
        assert torch.equal(again["image"], first[i]["image"]) and torch.equal(again["mask"], first[i]["mask"])
    crops.set_epoch(1)
    assert [crops[i]["name"] for i in range(12)] != [s["name"] for s in first]
    crops.set_epoch(0)
    assert [crops[i]["name"] for i in range(12)] == [s["name"] for s in first]
    assert 0 < crops.cached_bytes <= crops.cache_bytes
    tiny_cache = RandomCropDataset(AerialTiles(aerial_root), crop_size=16, samples_per_epoch=12, seed=3,
                                   cache_megabytes=1e-6)
    for i in range(12):
        assert tiny_cache[i]["name"] == first[i]["name"]
    assert len(tiny_cache._cache) == 1  # over budget: only the tile in use stays


def test_random_crop_content_and_padding(aerial_root: Path) -> None:
    tiles = AerialTiles(aerial_root)
    crops = RandomCropDataset(tiles, crop_size=(32, 24), samples_per_epoch=40, seed=0)
    seen_padded = False
    for i in range(40):
        tile, y, x = crops.crop_params(i)
        sample = crops[i]
        assert sample["name"] == f"{tiles.names[tile]}@{y}_{x}"
        assert sample["image"].shape == (3, 32, 24) and sample["mask"].shape == (32, 24)
        image, mask = tiles.load_pair(tile)
        height, width = mask.shape
        y0, x0 = max(y, 0), max(x, 0)
        inner = (slice(y0 - y, min(y + 32, height) - y), slice(x0 - x, min(x + 24, width) - x))
        expect = mask[y0 : y + 32, x0 : x + 24]
        assert np.array_equal(sample["mask"].numpy()[inner], expect)
        padded = np.ones((32, 24), bool)
        padded[inner] = False
        assert np.array_equal(crops.inside(i), ~padded)
        if padded.any():  # tile 1 (20x20) is smaller than the crop
            seen_padded = True
            assert (sample["mask"].numpy()[padded] == 255).all()
            assert (sample["image"].numpy()[:, padded] == 0).all()
    assert seen_padded


def test_random_crop_tile_choice_follows_area(aerial_root: Path) -> None:
    tiles = AerialTiles(aerial_root)
    crops = RandomCropDataset(tiles, crop_size=8, samples_per_epoch=3000, seed=0)
    counts = np.bincount([crops.crop_params(i)[0] for i in range(3000)], minlength=3)
    areas = np.array([40 * 60, 20 * 20, 100 * 30], dtype=float)
    assert np.allclose(counts / 3000, areas / areas.sum(), atol=0.03)


def test_random_crop_on_folder_dataset(tmp_path: Path) -> None:
    _make_folder(tmp_path, 2)
    crops = RandomCropDataset(FolderDataset(tmp_path, _ids_map()), crop_size=(8, 8), samples_per_epoch=5, seed=0)
    assert crops[0]["image"].shape == (3, 8, 8)
    assert "@" in crops[0]["name"]


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_determinism_and_format() -> None:
    a, b, c = SyntheticShapes(8, seed=0), SyntheticShapes(8, seed=0), SyntheticShapes(8, seed=1)
    for i in range(8):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
    assert not torch.equal(a[0]["image"], c[0]["image"])
    sample = a[3]
    assert sample["image"].shape == (3, 96, 128) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (96, 128) and sample["mask"].dtype == torch.int64
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert a.class_map.names[:4] == ("background", "disc", "box", "stripes")
    labels = a.image_labels(3)
    assert labels.tolist() == [float(k in sample["mask"].unique().tolist()) for k in range(5)]


def test_synthetic_covers_all_classes_with_distinct_colors() -> None:
    ds = SyntheticShapes(32, num_classes=8, seed=0)
    counts = torch.zeros(8)
    means = torch.zeros(8, 3)
    for i in range(32):
        sample = ds[i]
        for k in range(8):
            region = sample["mask"] == k
            counts[k] += region.sum()
            means[k] += sample["image"][:, region].sum(1)
    assert (counts > 0).all()
    assert counts[0] / counts.sum() < 0.8  # background does not swamp the foreground
    means /= counts[:, None]
    distances = torch.cdist(means, means) + torch.eye(8)
    assert distances.min() > 0.05


def test_synthetic_is_fast() -> None:
    ds = SyntheticShapes(40)
    ds[0]
    best = min(_time_all(ds) for _ in range(3))
    assert best < 0.005, f"{best * 1000:.2f} ms per image"


def _time_all(ds: SyntheticShapes) -> float:
    """CPU seconds per image (process time, so other busy processes do not count)."""
    start = time.process_time()
    for i in range(len(ds)):
        ds[i]
    return (time.process_time() - start) / len(ds)


# ----------------------------------------------------------------------------- collate, factory


def test_pad_collate() -> None:
    samples = [
        {"image": torch.rand(3, 5, 7), "mask": torch.zeros(5, 7, dtype=torch.long), "name": "a"},
        {"image": torch.rand(3, 6, 4), "mask": torch.ones(6, 4, dtype=torch.long), "name": "b"},
    ]
    batch = pad_collate(samples, ignore_index=255, size_divisor=4)
    assert batch["image"].shape == (2, 3, 8, 8) and batch["mask"].shape == (2, 8, 8)
    assert batch["name"] == ["a", "b"]
    assert batch["sizes"].tolist() == [[5, 7], [6, 4]]
    assert torch.equal(batch["image"][0, :, :5, :7], samples[0]["image"])
    assert batch["image"][0, :, 5:].abs().sum() == 0 and batch["image"][1, :, :, 4:].abs().sum() == 0
    assert (batch["mask"][0, 5:] == 255).all() and (batch["mask"][1, :, 4:] == 255).all()
    assert (batch["mask"][1, :6, :4] == 1).all()


def test_build_dataset(tmp_path: Path, aerial_root: Path) -> None:
    assert len(build_dataset("synthetic", num_images=3, size=(16, 16))) == 3
    _make_folder(tmp_path / "f", 2)
    assert len(build_dataset("folder", root=tmp_path / "f", class_map=["a", "b", "c", "d"])) == 2
    crops = build_dataset("aerial", root=aerial_root, tiles=[1, 2], crop_size=8, samples_per_epoch=7, seed=1)
    assert isinstance(crops, RandomCropDataset) and len(crops) == 7
    with pytest.raises(ConfigError, match=r"'nope' is unknown; valid kinds: \['aerial', 'camvid', 'folder', 'isprs', 'synthetic'\]"):
        build_dataset("nope")
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['colour'\]"):
        build_dataset("synthetic", colour=3)


# ----------------------------------------------------------------------------- real data


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real dataset not available at {path} (../shared/data is absent)")
    return path


def test_real_camvid_train() -> None:
    root = _need(SHARED_DATA / "camvid")
    ds = CamVid(root, "train")
    assert len(ds) == 367
    assert ds.num_classes == 11
    values: set[int] = set()
    for i in range(len(ds)):
        values |= set(np.unique(ds.load_mask(i)).tolist())
    assert values <= set(range(11)) | {255}
    assert 255 in values
    sample = ds[0]
    assert sample["image"].shape == (3, 360, 480)
    assert len(CamVid(root, "val")) == 101


def test_real_aerial_tile1_has_only_known_colors() -> None:
    root = _need(SHARED_DATA / "dubai_aerial")
    tiles = AerialTiles(root, tiles=[1])
    assert len(tiles) == 9
    assert tiles.validate() == []
    sample = tiles[0]
    assert set(sample["mask"].unique().tolist()) <= set(range(6)) | {255}


def test_real_aerial_random_crops_deterministic_across_epochs() -> None:
    root = _need(SHARED_DATA / "dubai_aerial")
    tiles = AerialTiles(root, tiles=[1, 2])
    a = RandomCropDataset(tiles, 128, samples_per_epoch=6, seed=5)
    b = RandomCropDataset(tiles, 128, samples_per_epoch=6, seed=5)
    a.set_epoch(2)
    b.set_epoch(1)
    b.set_epoch(2)
    for i in (5, 0, 3):
        assert a[i]["name"] == b[i]["name"]
        assert torch.equal(a[i]["mask"], b[i]["mask"]) and torch.equal(a[i]["image"], b[i]["image"])
    names_epoch2 = [a[i]["name"] for i in range(6)]
    a.set_epoch(3)
    assert [a[i]["name"] for i in range(6)] != names_epoch2
