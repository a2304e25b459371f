"""Labeled / unlabeled splits: deterministic, disjoint, nested across sizes, round-trip through
list files, and list-file errors naming the file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from labelwise.data.splits import read_name_list, split_labeled, write_name_list, write_split
from labelwise.errors import ConfigError, DataError

NAMES = [f"img_{i:03d}" for i in range(367)]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    a = split_labeled(NAMES[::-1], fraction=1 / 8, seed=3)  # input order does not matter
    b = split_labeled(NAMES, fraction=1 / 8, seed=3)
    assert a == b
    assert len(a.labeled) == 46  # round(367 / 8) = round(45.875)
    assert set(a.labeled).isdisjoint(a.unlabeled) and set(a.labeled) | set(a.unlabeled) == set(NAMES)
    assert a.labeled == sorted(a.labeled) and a.unlabeled == sorted(a.unlabeled)
    assert split_labeled(NAMES, fraction=1 / 8, seed=4).labeled != a.labeled
    # the reference: the first 46 of numpy's permutation of the sorted names
    order = np.random.default_rng(3).permutation(367)[:46]
    assert a.labeled == sorted(NAMES[i] for i in order)


def test_sizes_of_one_seed_are_nested() -> None:
    parts = [set(split_labeled(NAMES, fraction=f, seed=0).labeled) for f in (1 / 16, 1 / 8, 1 / 4, 1 / 2)]
    assert [len(p) for p in parts] == [23, 46, 92, 184]
    assert parts[0] < parts[1] < parts[2] < parts[3]
    assert split_labeled(NAMES, count=23, seed=0).labeled == sorted(parts[0])


def test_bad_sizes_are_config_errors() -> None:
    for kwargs in ({"fraction": 0.0}, {"fraction": 1.5}, {"count": 0}, {"count": 400}, {},
                   {"fraction": 0.5, "count": 3}):
        with pytest.raises(ConfigError):
            split_labeled(NAMES, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="unique"):
        split_labeled(["a", "a", "b"], count=1)


def test_list_files_round_trip_and_errors_name_file_and_line(tmp_path: Path) -> None:
    split = split_labeled(NAMES, fraction=1 / 16, seed=0)
    labeled, unlabeled = write_split(tmp_path / "split", split)
    assert read_name_list(labeled, NAMES) == split.labeled
    assert read_name_list(unlabeled, NAMES) == split.unlabeled
    assert labeled.read_text().startswith("# labelwise split: 23 of 367 labeled")
    path = write_name_list(tmp_path / "bad.txt", ["img_000", "img_001"])
    path.write_text(path.read_text() + "\n# a comment\nimg_000\n")
    with pytest.raises(DataError, match=r"bad\.txt:5: 'img_000' is listed twice \(first on line 1\)"):
        read_name_list(path)
    path.write_text("img_000\nnot_a_sample\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: 'not_a_sample' is not a sample"):
        read_name_list(path, NAMES)
    path.write_text("# only a comment\n\n")
    with pytest.raises(DataError, match="names no samples"):
        read_name_list(path)
    with pytest.raises(DataError, match="not found"):
        read_name_list(tmp_path / "missing.txt")


def test_train_list_restricts_the_training_split(tmp_path: Path) -> None:
    from labelwise.config import DataConfig
    from labelwise.data.build import build_datasets
    from labelwise.data.splits import dataset_names

    full = build_datasets(DataConfig(dataset="synthetic", synthetic_train_images=12, synthetic_size=(16, 16)))
    names = dataset_names(full.train)
    split = split_labeled(names, count=3, seed=1)
    labeled, _ = write_split(tmp_path, split)
    config = DataConfig(dataset="synthetic", synthetic_train_images=12, synthetic_size=(16, 16),
                        train_list=str(labeled))
    subset = build_datasets(config)
    assert len(subset.train) == 3 and subset.train_source is subset.train
    for k, name in enumerate(split.labeled):
        assert subset.train[k]["name"] == name
        assert torch.equal(subset.train[k]["mask"], full.train[names.index(name)]["mask"])
    labeled.write_text("nope\n")
    with pytest.raises(DataError, match="labeled.txt:1: 'nope' is not a sample"):
        build_datasets(config)
    with pytest.raises(ConfigError, match="train_tiles"):
        build_datasets(DataConfig(dataset="aerial", root=str(tmp_path), train_list=str(labeled)))
