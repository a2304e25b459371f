"""Reliability: run-folder lock, pre-flight file checks, checksums, failed writes, config ranges.

References are independent of the code under test: PIL's own full decode (truncation), PIL's
``ImageOps.exif_transpose`` (orientation), ``hashlib`` digests, an uninterrupted run (resume).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from safetensors.torch import load_file

from labelwise.cli import main
from labelwise.config import TrainConfig, load_config
from labelwise.data.io import image_size, read_image
from labelwise.data.preflight import check_image_file
from labelwise.errors import CheckpointError, ConfigError, DataError
from labelwise.features.store import FeatureCache, write_feature_cache
from labelwise.io import checkpoint as ckpt
from labelwise.io.run_lock import LOCK_NAME, RunFolderBusy, read_holder, run_folder_lock

ROOT = Path(__file__).resolve().parents[1]
TINY_SETS = ["stages=[{steps: 4, batch_size: 4, augment: {crop_size: null}}]", "checkpoint_every=2",
             "data.synthetic_train_images=8", "data.synthetic_val_images=2", "data.synthetic_size=[32, 32]",
             "model.options={width: 8, depth: 2}", "progress=false", "eval.every=0", "device=cpu"]
TINY = [*(arg for override in TINY_SETS for arg in ("--set", override)), "--no-report"]


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _holder_process(folder: Path) -> subprocess.Popen:
    """A second process that takes ``folder``'s lock and sleeps."""
    code = ("import sys, time\nfrom labelwise.io.run_lock import run_folder_lock\n"
            f"with run_folder_lock({str(folder)!r}, command='holder test'):\n"
            "    print('locked', flush=True)\n    time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


# ----------------------------------------------------------------------------- run-folder lock


def test_lock_refuses_a_second_process_names_it_and_takes_over_when_it_dies(tmp_path: Path) -> None:
    holder = _holder_process(tmp_path / "run")
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by pid {holder.pid} on .*holder test"):
            with run_folder_lock(tmp_path / "run"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert read_holder(tmp_path / "run")["pid"] == holder.pid  # the dead holder's record is still there
    with pytest.warns(UserWarning, match=rf"took over the lock of pid {holder.pid}"):
        with run_folder_lock(tmp_path / "run", command="me"):
            assert read_holder(tmp_path / "run")["pid"] == os.getpid()
            with run_folder_lock(tmp_path / "run"):  # re-entrant within one process
                pass
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # a clean release leaves no holder


def test_cli_refuses_a_run_folder_in_use_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    holder = _holder_process(tmp_path / "run")
    try:
        code, err = _run_cli(["train", "--run-dir", str(tmp_path / "run"), *TINY], capsys)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert code == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0] and str(tmp_path / "run") in err[0]
    assert not (tmp_path / "run" / "config.yaml").exists()


# ----------------------------------------------------------------------------- pre-flight checks


def _jpeg(path: Path, size: tuple[int, int] = (40, 30), exif: Image.Exif | None = None) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    image.save(path, format="JPEG", quality=90, **({"exif": exif} if exif is not None else {}))
    return path.read_bytes()


def _pil_decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9, 0.99])
def test_truncated_jpeg_and_png_are_found_as_pil_finds_them(tmp_path: Path, cut: float) -> None:
    data = _jpeg(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * cut)])
    Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint32).reshape(48, 64, 3).astype(np.uint8)).save(
        tmp_path / "full.png")
    png = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: int(len(png) * cut)])
    for name in ("cut.jpg", "cut.png"):
        path = tmp_path / name
        decodes = _pil_decodes(path)
        if decodes:  # PIL can rebuild some cut files; then the check must accept it as well
            check_image_file(path)
        else:
            with pytest.raises(DataError, match=rf"{name}: .*(truncated|corrupt)"):
                check_image_file(path)
    assert check_image_file(tmp_path / "full.jpg") == (30, 40)


def test_bytes_after_the_jpeg_end_marker_are_accepted(tmp_path: Path) -> None:
    data = _jpeg(tmp_path / "a.jpg")
    (tmp_path / "a.jpg").write_bytes(data + b"camera trailer " * 100)  # no EOI at the end: decoded to decide
    assert _pil_decodes(tmp_path / "a.jpg")
    assert check_image_file(tmp_path / "a.jpg") == (30, 40)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its data is one empty row)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00"))
            + chunk(b"IEND", b""))


def test_empty_random_and_bomb_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "bomb.png").write_bytes(_png_claiming(30000, 30000))
    with pytest.raises(DataError, match=r"empty\.png: empty file \(0 bytes\)"):
        check_image_file(tmp_path / "empty.png")
    with pytest.raises(DataError, match=r"noise\.jpg: not a readable image"):
        check_image_file(tmp_path / "noise.jpg")
    with pytest.raises(DataError, match=r"bomb\.png: refused: .*MAX_IMAGE_PIXELS"):
        check_image_file(tmp_path / "bomb.png")
    with pytest.raises(DataError, match=r"bomb\.png: refused"):
        read_image(tmp_path / "bomb.png")


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_like_pil_exif_transpose(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    _jpeg(path, size=(40, 30), exif=exif)
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    assert image_size(path) == expected.shape[:2] == check_image_file(path)
    np.testing.assert_array_equal(read_image(path), expected)


@pytest.mark.parametrize("mode", ["I;16", "P", "RGBA", "L", "CMYK", "LA"])
def test_every_pixel_format_reads_as_rgb_like_pil_convert(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else Image.fromarray(rng.integers(0, 255, (12, 16)).astype(np.uint16))
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png' if mode != 'I;16' else 'tif'}"
    image.save(path)
    out = read_image(path)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    if mode != "I;16":  # 16-bit grey is rescaled by its maximum, checked in test_data_io
        with Image.open(path) as img:
            np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


def test_too_few_images_for_a_batch_is_one_line_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--run-dir", str(tmp_path / "run"), *TINY, "--set", "data.synthetic_train_images=3"]
    code, err = _run_cli(args, capsys)
    assert code == 2 and len(err) == 1
    assert "3 training sample(s), fewer than one batch (stages.0.batch_size 4)" in err[0]
    assert "--set stages.0.batch_size=3" in err[0]
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_truncated_training_image_stops_before_step_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(4):
            _jpeg(root / split / "images" / f"{i}.jpg", size=(32, 32))
            Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / split / "labels" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    data = (root / "train" / "images" / "2.jpg").read_bytes()
    (root / "train" / "images" / "2.jpg").write_bytes(data[: len(data) // 2])
    args = ["train", "--run-dir", str(tmp_path / "run"), *TINY, "--set", "data.dataset=folder",
            "--set", f"data.root={root}"]
    code, err = _run_cli(args, capsys)
    assert code == 2 and len(err) == 1 and "2.jpg" in err[0] and "on_error=skip" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.warns(UserWarning, match=r"skipped 1 bad file.*2\.jpg"):
        code, err = _run_cli([*args, "--set", "data.on_error=skip", "--set", "stages.0.batch_size=3"], capsys)
    assert code == 0


# ----------------------------------------------------------------------------- checksums


def _checkpointed_run(run_dir: Path) -> None:
    assert main(["train", "--run-dir", str(run_dir), *TINY]) == 0


def test_flipped_bits_in_checkpoints_and_exports_are_refused(tmp_path: Path) -> None:
    import hashlib

    from labelwise.models.export import load_model

    run = tmp_path / "run"
    _checkpointed_run(run)
    latest = ckpt.latest_checkpoint_dir(run)
    assert latest is not None and latest.name == "step_0000004"
    state = json.loads((latest / "state.json").read_text())
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert state["sha256"][name] == hashlib.sha256((latest / name).read_bytes()).hexdigest()
    weights = latest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor's data: safetensors itself loads this silently
    weights.write_bytes(bytes(data))
    load_file(str(weights))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: checkpoint file is corrupt: its SHA-256 .*"
                                              r"delete .*step_0000004 to resume from step_0000002"):
        ckpt.load_training_checkpoint(latest)
    export = run / "weights.safetensors"
    data = bytearray(export.read_bytes())
    data[-5] ^= 0x01
    export.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: weights file is corrupt: its SHA-256"):
        load_model(run)


# ----------------------------------------------------------------------------- failed writes


def _cli_subprocess(args: list[str], file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "labelwise", *args], capture_output=True, text=True,
                          preexec_fn=limit if file_size_limit else None, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def test_file_size_limit_gives_one_line_keeps_the_checkpoint_and_resume_finishes_identically(tmp_path: Path) -> None:
    from labelwise.methods import supervised

    reference = tmp_path / "reference"
    _checkpointed_run(reference)
    run = tmp_path / "run"
    supervised.train(load_config(TrainConfig, None, [*TINY_SETS, f"run_dir={run}"]), stop_at=2)  # as if killed
    size = max(p.stat().st_size for p in (run / "checkpoints" / "step_0000002").iterdir())
    failed = _cli_subprocess(["train", "--run-dir", str(run), *TINY, "--resume"], file_size_limit=size // 2)
    err = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode == 2 and len(err) == 1 and "Traceback" not in failed.stderr
    assert "step_0000004: cannot write the checkpoint (File too large" in err[0]
    assert "the previous checkpoint step_0000002 is intact" in err[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step_0000002"]
    resumed = _cli_subprocess(["train", "--run-dir", str(run), *TINY, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    final, expected = load_file(str(run / "weights.safetensors")), load_file(str(reference / "weights.safetensors"))
    assert final.keys() == expected.keys() and all(np.array_equal(final[k], expected[k]) for k in final)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the log holds each step once


# ----------------------------------------------------------------------------- configs and caches


@pytest.mark.parametrize(("override", "message"), [
    ("stages.0.lr=.nan", r"stages\.0\.lr: expected a finite number, got nan"),
    ("stages.0.lr=-.inf", r"stages\.0\.lr: expected a finite number"),
    ("stages.0.lr=1e999", r"stages\.0\.lr: expected a finite number"),
    ("seed=123456789012345678901234567890", r"seed: .* is out of range"),
    ("data.batch_size=0", r"data\.batch_size: must be >= 1"),
    ("data.resize=[200000, 3]", r"data\.resize: need two sides in \[1, 16384\]"),
    ("stages.0.augment.crop_size=[99999, 9]", r"crop_size: at most 16384"),
    ("data.sneaky=1", r"data\.sneaky: unknown key"),
    ("stages.0.steps=ten", r"stages\.0\.steps: expected an integer"),
])
def test_config_values_out_of_range_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [override])


def test_feature_cache_manifest_that_does_not_match_its_arrays_is_refused(tmp_path: Path) -> None:
    features = np.random.default_rng(0).standard_normal((3, 4, 2, 2)).astype(np.float32)
    folder = tmp_path / "cache"
    write_feature_cache(folder, features, ["a", "b", "c"], image_size=(32, 32), stride=16,
                        labels=np.zeros((3, 32, 32), np.int64), num_classes=2)
    manifest_path = folder / "manifest.json"
    good = json.loads(manifest_path.read_text())
    FeatureCache.open(folder)
    cases = [
        ({**good, "names": ["a", "b"]}, r"2 names rows for 3 feature rows"),
        ({**good, "features": {**good["features"], "shape": [3, 4, 2, 3]}}, r"features\.npy: shape \[3, 4, 2, 2\]"),
        ({**good, "labels": {**good["labels"], "file": "../../outside.npy"}}, r"not a \.npy file name inside"),
        ({k: v for k, v in good.items() if k != "names"}, r"corrupt feature-cache manifest"),
        ([1, 2], r"not a complete"),
    ]
    for manifest, message in cases:
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(DataError, match=message):
            FeatureCache.open(folder)



def test_atomic_writes_name_a_refused_write_and_let_other_errors_through(tmp_path: Path) -> None:
    import errno

    from labelwise.errors import WriteError
    from labelwise.io.atomic import atomic_path, atomic_write_json

    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(WriteError, match=r"f\.json: cannot write \(No space left on device\); the previous version"):
        with atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]
    with pytest.raises(ConnectionRefusedError):  # not a write the system refused: unchanged
        with atomic_path(target):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_writes_get_the_mode_of_a_plain_write(tmp_path: Path) -> None:
    from labelwise.io.atomic import atomic_write_text

    (tmp_path / "plain.txt").write_text("x")  # the reference: open(..., "w") under this umask
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
