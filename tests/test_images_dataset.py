"""The unlabeled image dataset: discovery, order, max_side, and errors that name the file."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from labelwise.data import ImageFolderDataset
from labelwise.errors import DataError


def _write(path: Path, size: tuple[int, int] = (20, 30), seed: int = 0, mode: str = "RGB") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    if mode != "RGB":
        image = image.convert(mode)
        array = np.asarray(image.convert("RGB"))
    image.save(path)
    return array


def test_recursive_sorted_skips_labels_and_other_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a / "z.png", seed=1)
    _write(a / "sub" / "m.bmp", seed=2)
    _write(a / "images" / "c.png", seed=3)
    _write(a / "labels" / "c.png", seed=4)  # a label folder: skipped
    _write(a / "masks" / "d.png", seed=5)  # skipped
    _write(a / ".hidden" / "h.png", seed=6)  # skipped
    (a / "notes.txt").write_text("not an image")
    _write(b / "x.jpg", seed=7)
    _write(b / "grey.tif", seed=8, mode="L")
    ds = ImageFolderDataset([a, b])
    assert ds.names == ["images/c", "sub/m", "z", "grey", "x"]  # folder order, then sorted relative paths
    sample = ds[2]
    assert sample["name"] == "z"
    assert sample["image"].shape == (3, 20, 30) and sample["image"].dtype == torch.float32
    expected = torch.from_numpy(np.array(Image.open(a / "z.png"))).permute(2, 0, 1).float() / 255
    assert torch.equal(sample["image"], expected)
    grey = ds[3]["image"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert set(ds[0]) == {"image", "name"}


def test_max_side_shrinks_keeping_aspect(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:120, 0:200]
    smooth = np.stack([xx * 255 // 199, yy * 255 // 119, (xx + yy) * 255 // 318], -1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    _write(tmp_path / "small.png", size=(10, 12))
    ds = ImageFolderDataset(tmp_path, max_side=50)
    assert ds.names == ["big", "small"]
    assert ds[0]["image"].shape == (3, 30, 50)
    assert ds[1]["image"].shape == (3, 10, 12)  # never enlarged
    # the shrunk image is a faithful downscale (compared with a plain PIL resize of the full decode)
    reference = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB").resize((50, 30), Image.BILINEAR))
    assert np.abs(ds.load(0).astype(int) - reference.astype(int)).mean() < 2


def test_missing_and_empty_folders_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere: image folder not found"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "labels").mkdir(parents=True)
    _write(tmp_path / "empty" / "labels" / "a.png")
    with pytest.raises(DataError, match="empty: folder holds no images"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no folder"):
        ImageFolderDataset([])
    with pytest.raises(DataError, match="max_side"):
        ImageFolderDataset(tmp_path, max_side=0)


def test_unreadable_image_named_or_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "good1.png", seed=1)
    _write(tmp_path / "good2.jpg", seed=2)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataset(tmp_path)
    with pytest.warns(UserWarning, match=r"skipped 1 bad file.*2 image\(s\) kept.*broken.png"):
        ds = ImageFolderDataset(tmp_path, on_error="skip")
    assert ds.names == ["good1", "good2"]
    with pytest.raises(DataError, match="on_error"):
        ImageFolderDataset(tmp_path, on_error="ignore")  # type: ignore[arg-type]


def test_truncated_image_fails_at_construction_or_is_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", size=(64, 64), seed=1)
    data = (tmp_path / "a.png").read_bytes()
    _write(tmp_path / "b.png", size=(64, 64), seed=2)
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    with pytest.raises(DataError, match=r"a\.png: .*truncated"):  # the pre-flight check finds it
        ImageFolderDataset(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipping = ImageFolderDataset(tmp_path, on_error="skip")
    assert skipping.names == ["b"] and any("a.png" in str(w.message) for w in caught)
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="no readable images"):
        ImageFolderDataset(tmp_path, on_error="skip")
