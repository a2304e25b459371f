"""Property-based fuzzing of every reader (hypothesis): any input gives the result or the
project's error naming the file, never another exception. References are independent: PIL's
full decode, literal per-pixel loops over the label rules, Python's own parsers.

The CLI-level fuzzing (exit status 2, one line, no partial output) is the benchmark
``benchmarks/fuzz_readers.py``; these tests keep the readers' contracts in the suite.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from labelwise.config import TrainConfig, load_config
from labelwise.data.classmap import ClassMap
from labelwise.data.io import colors_to_labels, ids_to_labels, read_image, read_label
from labelwise.data.preflight import check_image_file
from labelwise.data.splits import read_name_list
from labelwise.data.tags import read_tag_file
from labelwise.errors import CheckpointError, ConfigError, DataError
from labelwise.features.store import FeatureCache
from labelwise.io.tensors import read_safetensors

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLASSES = ClassMap.from_dict({"classes": ["a", "b", "c", "d"], "colors": ["#000000", "#FF0000", "#00FF00",
                                                                          "#0000FF"], "ignore_index": 255})


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="lw_fuzz_"))


@FUZZ
@given(data=st.binary(max_size=3000), suffix=st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".gif"]))
def test_random_bytes_read_as_an_image_or_a_data_error_naming_the_file(data: bytes, suffix: str) -> None:
    path = _scratch() / f"fuzzed{suffix}"
    path.write_bytes(data)
    try:
        image = read_image(path)
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def _pil_decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
    except Exception:  # noqa: BLE001 - the reference: whatever PIL refuses
        return False
    return True


@FUZZ
@given(cut=st.floats(0.0, 1.0), kind=st.sampled_from(["JPEG", "PNG"]), seed=st.integers(0, 2**16))
def test_preflight_agrees_with_a_full_pil_decode_on_every_cut(cut: float, kind: str, seed: int) -> None:
    folder = _scratch()
    rng = np.random.default_rng(seed)
    full = folder / f"full.{kind.lower()}"
    Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(full, format=kind)
    data = full.read_bytes()
    path = folder / f"cut.{kind.lower()}"
    path.write_bytes(data[: int(len(data) * cut)])
    if _pil_decodes(path):
        assert check_image_file(path) == (20, 28)
    else:
        with pytest.raises(DataError, match="cut"):
            check_image_file(path)


@FUZZ
@given(values=st.lists(st.integers(0, 300), min_size=1, max_size=64))
def test_class_id_masks_follow_the_rule_pixel_by_pixel(values: list[int]) -> None:
    array = np.asarray(values, dtype=np.int64).reshape(1, -1)
    bad = [v for v in values if v >= CLASSES.num_classes and v != 255]
    if bad:
        with pytest.raises(DataError, match=rf"mask: invalid class id.*{len(bad)} pixel\(s\)"):
            ids_to_labels(array, CLASSES)
        return
    expected = [255 if v == 255 else v for v in values]
    assert ids_to_labels(array, CLASSES)[0].tolist() == expected


@FUZZ
@given(colors=st.lists(st.sampled_from([(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (1, 2, 3), (9, 9, 9)]),
                       min_size=1, max_size=32))
def test_color_masks_follow_the_class_colors_pixel_by_pixel(colors: list[tuple[int, int, int]]) -> None:
    table = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2, (0, 0, 255): 3}
    rgb = np.asarray(colors, dtype=np.uint8).reshape(1, -1, 3)
    unknown = [c for c in colors if c not in table]
    if unknown:
        with pytest.raises(DataError, match=rf"unknown color.*{len(unknown)} pixel\(s\)"):
            colors_to_labels(rgb, CLASSES)
        return
    assert colors_to_labels(rgb, CLASSES)[0].tolist() == [table[c] for c in colors]


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".png", ".bmp"]))
def test_random_mask_files_give_labels_or_a_data_error(data: bytes, suffix: str) -> None:
    path = _scratch() / f"mask{suffix}"
    path.write_bytes(data)
    try:
        labels = read_label(path, CLASSES)
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3, 255}


@FUZZ
@given(data=st.binary(max_size=400) | st.text(max_size=200).map(lambda t: t.encode("utf-8")),
       suffix=st.sampled_from([".csv", ".json"]))
def test_tag_files_give_tags_or_a_data_error_naming_the_file(data: bytes, suffix: str) -> None:
    path = _scratch() / f"tags{suffix}"
    path.write_bytes(data)
    names = ["img0", "img1"]
    try:
        tags = read_tag_file(path, CLASSES, names)
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert tags.names == names


@FUZZ
@given(lines=st.lists(st.sampled_from(["s0", "s1", "../s0", "/abs/s1", "s0/../../x", "#c", ""])
                      | st.text(max_size=12), max_size=6))
def test_name_lists_only_ever_name_samples_of_the_dataset(lines: list[str]) -> None:
    path = _scratch() / "list.txt"
    path.write_text("\n".join(lines))
    try:
        names = read_name_list(path, ["s0", "s1"])
    except DataError as exc:
        assert str(path) in str(exc)
    else:
        assert set(names) <= {"s0", "s1"}


VALUES = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(max_size=8) | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                       st.integers(), max_size=2))


@FUZZ
@given(key=st.sampled_from(["seed", "stages.0.lr", "stages.0.steps", "data.batch_size", "data.resize", "precision",
                            "model.name", "optim.name", "data.dataset", "eval.every", "checkpoint_every", "sneaky"]),
       value=VALUES)
def test_any_config_value_loads_or_names_its_key(key: str, value: object) -> None:
    try:
        config = load_config(TrainConfig, None, [f"{key}={json.dumps(value)}"])
    except ConfigError as exc:
        assert str(exc).startswith(key.split(".")[0])
    except ValueError as exc:  # json.dumps of NaN / inf gives NaN / Infinity, which YAML reads as strings
        pytest.fail(f"{key}={value!r} raised {exc!r}")
    else:
        assert isinstance(config, TrainConfig)


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_safetensors_bytes_are_a_checkpoint_error(data: bytes) -> None:
    path = _scratch() / "w.safetensors"
    path.write_bytes(data)
    try:
        read_safetensors(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=12)


@FUZZ
@given(extra=st.dictionaries(st.sampled_from(["features", "labels", "attention", "names", "format", "complete"]),
                             JSONISH, max_size=6))
def test_feature_cache_manifests_open_or_give_a_data_error(extra: dict) -> None:
    from labelwise.features.key import FORMAT

    folder = _scratch() / "cache"
    folder.mkdir()
    np.save(folder / "features.npy", np.zeros((2, 3, 1, 1), np.float16))
    manifest = {"format": FORMAT, "complete": True, "features": {"shape": [2, 3, 1, 1]}, "names": ["a", "b"],
                "labels": None, "attention": {}, **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    try:
        cache = FeatureCache.open(folder)
    except DataError as exc:
        assert "manifest.json" in str(exc) or "features.npy" in str(exc)
    else:
        assert len(cache) == 2
