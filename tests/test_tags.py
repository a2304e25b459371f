"""Image-level tags: derivation from masks against a literal per-pixel count, tag-file reading
and every validation error naming the file and the entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from labelwise.data.classmap import ClassMap
from labelwise.data.synthetic import SyntheticShapes
from labelwise.data.tags import ImageTags, read_tag_file, tags_from_dataset, tags_from_masks
from labelwise.errors import DataError

CLASSES = ClassMap.from_names(["sky", "road", "car", "tree"])


def _literal_tags(mask: np.ndarray, num_classes: int, min_fraction: float, ignore: int) -> list[bool]:
    labeled = [int(v) for v in mask.ravel() if v != ignore and 0 <= v < num_classes]
    return [labeled.count(c) > 0 and labeled.count(c) >= min_fraction * len(labeled) for c in range(num_classes)]


def test_tags_from_masks_match_a_literal_count() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (5, 7, 9), generator=g)
    masks[0, :, :] = 1
    masks[1, :, :] = 1
    masks[1, 0, 0] = 3  # one pixel of class 3 out of 63: 1.6%
    masks[2, :3] = 255  # ignored pixels leave the denominator
    masks[3, :, :] = 255  # nothing labeled: no class
    masks[4, 0, :2] = 7  # ids outside the class range are not labeled pixels
    for min_fraction in (0.01, 0.02, 0.3):
        got = tags_from_masks(masks, 4, min_fraction)
        expected = [_literal_tags(m.numpy(), 4, min_fraction, 255) for m in masks]
        assert got.tolist() == expected
    assert not tags_from_masks(masks, 4)[3].any()
    assert tags_from_masks(masks, 4, 0.01)[1, 3] and not tags_from_masks(masks, 4, 0.02)[1, 3]


def test_a_class_at_exactly_the_fraction_is_present() -> None:
    mask = torch.zeros(1, 4, 5, dtype=torch.long)
    mask[0, 0, :2] = 2  # 2 of 20 pixels = 0.1
    assert tags_from_masks(mask, 3, 0.1)[0].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="min_fraction"):
        tags_from_masks(mask, 3, 0.0)


def test_tags_from_dataset_equal_per_image_literal_counts() -> None:
    dataset = SyntheticShapes(num_images=6, size=(24, 32), num_classes=4, seed=3)
    tags = tags_from_dataset(dataset, CLASSES, min_fraction=0.05)
    assert tags.names == [dataset[i]["name"] for i in range(6)]
    for i in range(6):
        assert tags.present[i].tolist() == _literal_tags(dataset[i]["mask"].numpy(), 4, 0.05, 255)


def test_csv_and_json_files_read_to_the_same_tags(tmp_path: Path) -> None:
    csv_path = tmp_path / "tags.csv"
    csv_path.write_text("image,tags\nimg_b,car;road\n\nsub/img_a,sky | tree\n")
    json_path = tmp_path / "tags.json"
    json_path.write_text(json.dumps({"images": {"sub/img_a": ["tree", "sky"], "img_b": ["road", "car"]}}))
    order = ["sub/img_a", "img_b"]
    from_csv = read_tag_file(csv_path, CLASSES, order)
    from_json = read_tag_file(json_path, CLASSES, order)
    assert from_csv.names == order == from_json.names
    assert from_csv.present.tolist() == [[True, False, False, True], [False, True, True, False]]
    assert np.array_equal(from_csv.present, from_json.present)
    saved = read_tag_file(from_csv.save(tmp_path / "round.json"), CLASSES)
    assert saved.names == order and np.array_equal(saved.present, from_csv.present)
    assert from_csv.for_names(["img_b"]).tolist() == [[False, True, True, False]]
    assert isinstance(from_csv, ImageTags) and len(from_csv) == 2


@pytest.mark.parametrize(("content", "message"), [
    ("image,tags\na,sky\nb,bus\n", r"tags\.csv: line 3: unknown class 'bus' for image 'b'"),
    ("image,tags\na,sky\nb,\n", r"tags\.csv: line 3: image 'b' has no tags"),
    ("image,tags\na,sky\na,road\n", r"tags\.csv: line 3: image 'a' appears twice"),
    ("image,tags\na,sky\nc,road\n", r"tags\.csv: tags for 1 image\(s\) that are not among the images: \['c'\]"),
    ("image,tags\na,sky\n", r"tags\.csv: 1 image\(s\) have no entry: \['b'\]"),
    ("name,classes\na,sky\n", r"tags\.csv: line 1: expected the header 'image,tags'"),
    ("image,tags\na,sky,road\n", r"tags\.csv: line 2: expected 2 columns"),
])
def test_csv_errors_name_the_file_and_the_entry(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "tags.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_tag_file(path, CLASSES, ["a", "b"])


def test_json_and_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"a": "sky"}))
    with pytest.raises(DataError, match=r"tags\.json: entry 'a': tags must be a list"):
        read_tag_file(path, CLASSES)
    path.write_text(json.dumps({"a": ["Sky"]}))
    with pytest.raises(DataError, match=r"tags\.json: entry 'a': unknown class 'Sky'"):
        read_tag_file(path, CLASSES)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"tags\.json: not valid JSON"):
        read_tag_file(path, CLASSES)
    with pytest.raises(DataError, match=r"missing\.csv: tag file not found"):
        read_tag_file(tmp_path / "missing.csv", CLASSES)
    other = tmp_path / "tags.txt"
    other.write_text("a sky")
    with pytest.raises(DataError, match=r"tags\.txt: unknown tag file type"):
        read_tag_file(other, CLASSES)
