"""Fuzzing every reader through the command line (issue 26).

Each case writes one hostile (or merely unusual) file and runs the ``labelwise`` command that
reads it, in this process (``labelwise.cli.main``, stderr captured, a time limit per case). A case
is ``handled`` when:

- it must fail (random bytes, truncated or empty files, decompression bombs, symlink loops,
  wrong mask sizes, invalid label values or colours, bad encodings, ``..`` or absolute entries,
  mistyped / non-finite / huge / unknown config values, damaged checkpoints, exports and
  caches, a pickle that would run code): exit status 2 and exactly one error line that names the
  file (or the config key), no traceback, no output written (no prediction, no checkpoint or
  model in the run folder), and a pickle's payload never ran;
- it must work (16-bit, palette, RGBA, grey, CMYK, EXIF-rotated images, non-UTF-8 file names, a
  corrupt feature cache that is rebuilt, a corrupt checkpoint pointer that the newest checkpoint
  folder replaces): exit status 0 and the right output (a prediction of the displayed size).

Truncated files are judged against PIL's own full decode: a cut PNG that PIL still decodes whole
must work, any other must fail.

    .venv/bin/python benchmarks/fuzz_readers.py                # every reader, ~400 cases
    .venv/bin/python benchmarks/fuzz_readers.py --per-kind 3 --suffix _quick

Results: ``benchmarks/results/fuzz_readers.json``, rows ``reader``, ``tried``, ``handled`` (and the
cases not handled, with what happened).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import struct
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from _common import write_results

CLASSES = {"classes": ["background", "disc", "box", "stripes"], "ignore_index": 255}
SYNTHETIC = ["data.dataset=synthetic", "data.synthetic_train_images=8", "data.synthetic_val_images=2",
             "data.synthetic_size=[32, 48]", "data.synthetic_classes=4"]
TINY_TRAIN = [*SYNTHETIC, "model.options={width: 8, depth: 2}", "stages.0.steps=2", "data.batch_size=4",
              "device=cpu", "progress=false", "checkpoint_every=1", "eval.every=0"]
CASE_SECONDS = 60


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@dataclass
class Case:
    """One fuzz case: ``argv`` for ``labelwise``, whether it must fail, the text its error line
    must contain, and folders that must stay free of outputs when it fails."""

    reader: str
    name: str
    argv: list[str]
    must_fail: bool
    names: str
    clean: list[Path] = field(default_factory=list)
    check_ok: Callable[[], bool] | None = None
    marker: Path | None = None


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:  # noqa: ARG001
    raise Timeout


def run_case(case: Case) -> tuple[bool, str]:
    """Run ``case``; returns (handled, what happened)."""
    from labelwise.cli import main

    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code: int | str = main(case.argv)
    except Timeout:
        code = "timeout"
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:  # noqa: BLE001 - anything escaping main is what we count
        code = "traceback: " + traceback.format_exc(limit=3).strip().splitlines()[-1]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    lines = [line for line in err.getvalue().splitlines() if line.strip() and "warning:" not in line]
    ran_payload = case.marker is not None and case.marker.exists()
    if case.must_fail:
        written = [str(p) for folder in case.clean if folder.exists() for p in folder.rglob("*")
                   if p.is_file() and p.name in ("model.json", "weights.safetensors", "state.json")
                   or (p.is_file() and p.suffix == ".png" and "ids" in p.parts)]
        handled = (code == 2 and len(lines) == 1 and case.names in lines[0] and "Traceback" not in err.getvalue()
                   and not written and not ran_payload)
        detail = f"exit {code}; {lines[:2]}; outputs {written[:2]}; payload ran {ran_payload}"
    else:
        ok = code == 0 and (case.check_ok() if case.check_ok else True)
        handled = bool(ok) and not ran_payload
        detail = f"exit {code}; {lines[:2]}"
    return handled, detail


# ----------------------------------------------------------------------------- file makers


def _random_image(rng: np.random.Generator, h: int = 24, w: int = 32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


def _pil_decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
    except Exception:  # noqa: BLE001
        return False
    return True


class Payload:
    """Unpickling this creates ``path``: the proof that a pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (str(self.path),))


# ----------------------------------------------------------------------------- case builders


def _file_cases(reader: str, work: Path, files: dict[str, tuple[bytes, str]],
                argv: Callable[[Path, Path], list[str]]) -> list[Case]:
    """One must-fail case per file: ``files`` maps a file name to (its bytes, the text its error
    line must contain); ``argv(file, run_dir)`` is the command reading it."""
    cases = []
    for name, (data, names) in files.items():
        path = work / reader / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        run_dir = work / f"{reader}_runs" / name
        cases.append(Case(reader, name, argv(path, run_dir), True, names, [run_dir]))
    return cases


def image_cases(work: Path, model: Path, rng: np.random.Generator, n: int) -> list[Case]:
    cases: list[Case] = []

    def predict(name: str, path: Path, must_fail: bool, size: tuple[int, int] | None = None) -> None:
        out = work / "pred" / name
        ids = out / "ids" / f"{path.stem}.png"

        def check() -> bool:
            if not ids.is_file():
                return False
            with Image.open(ids) as img:
                return size is None or (img.height, img.width) == size
        cases.append(Case("images", name, ["predict", str(model), str(path), "--out", str(out), "--device", "cpu"],
                          must_fail, path.name, [out], check))

    folder = work / "images"
    folder.mkdir()
    for i in range(n):
        path = folder / f"random{i}{rng.choice(['.jpg', '.png', '.tif', '.bmp'])}"
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes())
        predict(f"random_bytes_{i}", path, True)
    for kind in ("jpg", "png"):
        for i in range(n):
            full = folder / f"full{i}.{kind}"
            _random_image(rng, 40, 56).save(full)
            data = full.read_bytes()
            path = folder / f"cut{i}.{kind}"
            path.write_bytes(data[: int(len(data) * rng.uniform(0.05, 0.999))])
            full.unlink()
            predict(f"truncated_{kind}_{i}", path, not _pil_decodes(path), (40, 56))
    (folder / "empty.png").write_bytes(b"")
    predict("empty", folder / "empty.png", True)
    (folder / "bomb.png").write_bytes(_png_claiming(30000, 30000))
    predict("decompression_bomb", folder / "bomb.png", True)
    os.symlink(folder / "loop_b.png", folder / "loop_a.png")
    os.symlink(folder / "loop_a.png", folder / "loop_b.png")
    predict("symlink_loop", folder / "loop_a.png", True)
    (folder / "adir.png").mkdir()
    predict("folder_named_png", folder / "adir.png", True)
    base = _random_image(rng, 24, 32)
    variants = {
        "grey_16bit.png": Image.fromarray(rng.integers(0, 65535, (24, 32)).astype(np.uint16)),
        "palette.png": base.convert("P"), "rgba.png": base.convert("RGBA"), "grey.png": base.convert("L"),
        "grey_alpha.png": base.convert("LA"), "cmyk.jpg": base.convert("CMYK"), "bilevel.png": base.convert("1"),
    }
    for name, image in variants.items():
        image.save(folder / name)
        predict(f"valid_{name}", folder / name, False, (24, 32))
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        base.save(folder / f"exif{orientation}.jpg", exif=exif)
        predict(f"exif_orientation_{orientation}", folder / f"exif{orientation}.jpg", False,
                (32, 24) if orientation in (6, 8) else (24, 32))
    odd = Path(os.fsdecode(bytes(folder) + b"/caf\xe9_\xff.png"))  # not UTF-8: a surrogate-escaped name
    base.save(odd)
    predict("non_utf8_name", odd, False, (24, 32))
    return cases


def mask_cases(work: Path, model: Path, rng: np.random.Generator, n: int) -> list[Case]:
    cases: list[Case] = []
    for i, kind in enumerate(["wrong_size"] * n + ["out_of_range"] * n + ["unknown_color"] * n + ["random_bytes"] * n
                             + ["truncated"] * n + ["empty"]):
        root = work / "masks" / f"{kind}_{i}"
        (root / "val" / "images").mkdir(parents=True)
        (root / "val" / "labels").mkdir(parents=True)
        (root / "classes.json").write_text(json.dumps(CLASSES))
        for j in range(2):
            _random_image(rng, 24, 32).save(root / "val" / "images" / f"{j}.png")
            Image.fromarray(rng.integers(0, 4, (24, 32)).astype(np.uint8)).save(root / "val" / "labels" / f"{j}.png")
        bad = root / "val" / "labels" / "1.png"
        if kind == "wrong_size":
            Image.fromarray(np.zeros((int(rng.integers(1, 60)), int(rng.integers(33, 60))), np.uint8)).save(bad)
        elif kind == "out_of_range":
            values = rng.integers(0, 4, (24, 32)).astype(np.uint8)
            values[rng.integers(0, 24), rng.integers(0, 32)] = int(rng.integers(4, 255))
            Image.fromarray(values).save(bad)
        elif kind == "unknown_color":
            Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(bad)
        elif kind == "random_bytes":
            bad.write_bytes(rng.integers(0, 256, int(rng.integers(1, 2048)), dtype=np.uint8).tobytes())
        elif kind == "truncated":
            data = bad.read_bytes()
            bad.write_bytes(data[: int(len(data) * rng.uniform(0.05, 0.8))])
        else:
            bad.write_bytes(b"")
        must_fail = kind != "truncated" or not _pil_decodes(bad)
        cases.append(Case("masks", f"{kind}_{i}", ["evaluate", str(model), "--device", "cpu",
                                                    *_sets(["data.dataset=folder", f"data.root={root}"])],
                          must_fail, "1.png"))
    return cases


def tag_cases(work: Path, vit: Path, rng: np.random.Generator, n: int) -> list[Case]:
    images = work / "tag_images"
    images.mkdir()
    for j in range(4):
        _random_image(rng, 32, 48).save(images / f"img{j}.png")
    (work / "tag_classes.json").write_text(json.dumps(CLASSES))
    good = {f"img{j}": ["disc"] for j in range(4)}
    contents: dict[str, bytes] = {
        "latin1.csv": "image,tags\nimg0,disc\nimg1,d\xe9c\n".encode("latin-1"),
        "utf16.json": json.dumps(good).encode("utf-16"),
        "dotdot.json": json.dumps({**good, "../../etc/passwd": ["disc"]}).encode(),
        "absolute.csv": b"image,tags\n" + b"".join(f"img{j},disc\n".encode() for j in range(4)) + b"/etc/passwd,disc\n",
        "unknown_class.json": json.dumps({**good, "img1": ["dragon"]}).encode(),
        "no_tags.json": json.dumps({**good, "img2": []}).encode(),
        "not_object.json": b"[1, 2, 3]", "malformed.json": b"{\"img0\": [\"disc\"",
        "wrong_header.csv": b"name,labels\nimg0,disc\n", "three_columns.csv": b"image,tags\nimg0,disc,box\n",
        "empty.csv": b"", "deep.json": b"[" * 100000 + b"]" * 100000, "tags_not_list.json": b'{"img0": 5}',
        "missing_image.json": json.dumps({"img0": ["disc"]}).encode(),
    }
    for i in range(n):
        contents[f"random{i}.{rng.choice(['csv', 'json'])}"] = rng.integers(0, 256, int(rng.integers(1, 512)),
                                                                             dtype=np.uint8).tobytes()
    return _file_cases("tags", work, {name: (data, name) for name, data in contents.items()},
                       lambda path, run_dir: [
                           "weak", "run", "--images", str(images), "--tags", str(path), "--classes",
                           str(work / "tag_classes.json"), "--run-dir", str(run_dir), "--no-report",
                           *_sets([f"backbone={vit}", "image_size=[32, 48]", "stages.0.steps=1", "batch_size=2",
                                   "device=cpu", "progress=false"])])


def split_cases(work: Path, rng: np.random.Generator, n: int) -> list[Case]:
    contents: dict[str, bytes] = {
        "latin1.txt": "synthetic_0000\nsynth\xe9tic\n".encode("latin-1"), "dotdot.txt": b"../../etc/passwd\n",
        "absolute.txt": b"/etc/passwd\n", "unknown.txt": b"no_such_sample\n",
        "duplicate.txt": b"synthetic_0000\nsynthetic_0000\n", "empty.txt": b"", "comments_only.txt": b"# nothing\n",
    }
    for i in range(n):
        contents[f"random{i}.txt"] = rng.integers(0, 256, int(rng.integers(1, 512)), dtype=np.uint8).tobytes()
    return _file_cases("split_lists", work, {name: (data, name) for name, data in contents.items()},
                       lambda path, run_dir: ["train", "--run-dir", str(run_dir), "--no-report",
                                              *_sets([*TINY_TRAIN, f"data.train_list={path}"])])


YAML_KEYS = {  # key -> values of the wrong type (each case takes one)
    "seed": ["abc", [1], {"a": 1}, 1.5, True], "stages": ["fast", 3, {"steps": 2}],
    "data.batch_size": ["eight", -1, 0, 2.5, [8]], "model.name": [5, ["unet"], "no_such_model"],
    "optim.name": ["adamx", 3], "data.resize": [[1], "big", [0, 0], [1, 2, 3]], "precision": ["fp8", 16],
    "data.dataset": ["imagenet", None], "checkpoint_every": ["often", -5], "eval.every": ["x"],
}


def _nested(key: str, value: object) -> dict:
    parts = key.split(".")
    node: dict = {}
    cursor = node
    for part in parts[:-1]:
        cursor[part] = {}
        cursor = cursor[part]
    cursor[parts[-1]] = value
    return node


def yaml_cases(work: Path, rng: np.random.Generator, n: int) -> list[Case]:
    import yaml

    texts: dict[str, tuple[bytes, str]] = {}
    for key, values in YAML_KEYS.items():
        for j, value in enumerate(values):
            texts[f"wrong_{key}_{j}.yaml"] = (yaml.safe_dump(_nested(key, value)).encode(), key.split(".")[-1])
    for j, value in enumerate([".nan", ".inf", "-.inf", "1e999", "-1e999"]):
        texts[f"nonfinite_{j}.yaml"] = (f"stages:\n- lr: {value}\n".encode(), "stages.0.lr")
    for j, value in enumerate([10**30, -(10**30), 2**63, 10**400]):
        texts[f"huge_{j}.yaml"] = (f"seed: {value}\n".encode(), "seed")
    texts["huge_batch.yaml"] = (b"data:\n  batch_size: 1000000000\n", "batch_size")
    texts["huge_resize.yaml"] = (b"data:\n  resize: [1000000, 1000000]\n", "data.resize")
    unknown = {"sneaky": {"sneaky": 1}, "data.sneaky": {"data": {"sneaky": 1}}, "optim.lrr": {"optim": {"lrr": 1}},
               "stepz": {"stages": [{"stepz": 1}]}, "opts": {"model": {"opts": {}}}}
    for key, mapping in unknown.items():
        texts[f"unknown_{key}.yaml"] = (yaml.safe_dump(mapping).encode(), key)
    texts["top_level_list.yaml"] = (b"- 1\n- 2\n", "top_level_list.yaml")
    texts["not_yaml.yaml"] = (b"a: [1, 2\nb: {", "not_yaml.yaml")
    texts["latin1.yaml"] = ("seed: 1\nrun_dir: caf\xe9\x81\n".encode("latin-1"), "latin1.yaml")
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join('*' + chr(97 + i) for _ in range(9))}]\n" for i in range(8))
    texts["billion_laughs.yaml"] = (laughs.encode(), "billion_laughs.yaml")
    texts["deep_nesting.yaml"] = (b"seed: " + b"[" * 50000 + b"]" * 50000 + b"\n", "deep_nesting.yaml")
    for i in range(n):
        texts[f"random{i}.yaml"] = (rng.integers(0, 256, int(rng.integers(1, 512)), dtype=np.uint8).tobytes(),
                                    f"random{i}.yaml")
    return _file_cases("yaml_configs", work, texts, lambda path, run_dir: [
        "train", "--config", str(path), "--run-dir", str(run_dir), "--no-report"])


def checkpoint_cases(work: Path, finished: Path, rng: np.random.Generator) -> list[Case]:
    cases: list[Case] = []

    def damaged(name: str, damage: Callable[[Path], str], must_fail: bool = True, resume: bool = True) -> None:
        run = work / "ckpt" / name
        shutil.copytree(finished, run)
        names = damage(run)
        if resume:
            argv = ["train", "--run-dir", str(run), "--resume", "--no-report",
                    *_sets([*TINY_TRAIN, "stages.0.steps=3"])]
            clean = [run / "checkpoints" / "step_0000003"]
        else:
            argv = ["evaluate", str(run), "--device", "cpu"]
            clean = []
        cases.append(Case("checkpoints", name, argv, must_fail, names, clean))

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * rng.uniform(0.1, 0.9))])

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[-int(rng.integers(1, 64))] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))

    latest = "checkpoints/step_0000002"
    for i in range(3):
        damaged(f"truncated_model_{i}", lambda r: truncate(r / latest / "model.safetensors") or "model.safetensors")
        damaged(f"bitflip_model_{i}", lambda r: flip(r / latest / "model.safetensors") or "model.safetensors")
        damaged(f"bitflip_optimizer_{i}", lambda r: flip(r / latest / "optimizer.safetensors")
                or "optimizer.safetensors")
        damaged(f"truncated_export_{i}", lambda r: truncate(r / "weights.safetensors") or "weights.safetensors",
                resume=False)
        damaged(f"bitflip_export_{i}", lambda r: flip(r / "weights.safetensors") or "weights.safetensors", resume=False)
    def replace_with(relative: str, data: bytes) -> Callable[[Path], str]:
        def damage(run: Path) -> str:
            (run / relative).write_bytes(data)
            return Path(relative).name
        return damage

    damaged("empty_model", replace_with(f"{latest}/model.safetensors", b""))
    damaged("state_garbage", replace_with(f"{latest}/state.json", b"\x00\xff{"))
    damaged("state_not_object", replace_with(f"{latest}/state.json", b"[1]"))
    damaged("pointer_garbage", replace_with("checkpoints/latest.json", b"{"), must_fail=False)
    damaged("pointer_escape", replace_with("checkpoints/latest.json", b'{"step": 2, "dir": "../../../../tmp"}'),
            must_fail=False)
    damaged("model_json_garbage", replace_with("model.json", b"\x89garbage"), resume=False)
    damaged("model_json_list", replace_with("model.json", b"[]"), resume=False)

    def wrong_architecture(run: Path) -> str:
        info = json.loads((run / "model.json").read_text())
        info["architecture"] = {**info["architecture"], "name": "no_such_model"}
        (run / "model.json").write_text(json.dumps(info))
        return "model.json"
    damaged("model_json_architecture", wrong_architecture, resume=False)

    image = work / "pickle_image.png"
    _random_image(rng, 32, 32).save(image)
    for i, suffix in enumerate([".pth", ".pt", ".bin"]):
        marker = work / f"payload_ran_{i}"
        evil = work / f"evil{i}{suffix}"
        torch.save({"model": Payload(marker)}, evil)
        run_dir = work / f"pickle_run{i}"
        cases.append(Case("checkpoints", f"pickle_init{suffix}", ["train", "--run-dir", str(run_dir), "--no-report",
                                                                  *_sets([*TINY_TRAIN, f"model.init={evil}"])],
                          True, evil.name, [run_dir], marker=marker))
        marker2 = work / f"payload2_ran_{i}"
        evil2 = work / f"evil_vit{i}{suffix}"
        with open(evil2, "wb") as handle:
            pickle.dump({"model": Payload(marker2)}, handle)
        cases.append(Case("checkpoints", f"pickle_backbone{suffix}", [
            "attention", str(image), "--backbone", str(evil2), "--out", str(work / f"att{i}")], True, evil2.name,
            [work / f"att{i}"], marker=marker2))
    return cases


def cache_cases(work: Path, vit: Path) -> list[Case]:
    from labelwise.features.store import MANIFEST

    def argv(run: Path, cache: Path) -> list[str]:
        return ["unsupervised", "train", "--run-dir", str(run), "--no-report", *_sets([
            *SYNTHETIC, f"features.backbone={vit}", "features.crop_mode=whole", "features.crop_size=32",
            f"features.cache_dir={cache}", "method=kmeans", "eval.clusters=4", "device=cpu", "progress=false",
            "eval.linear_probe=false"])]

    cache = work / "cache_seed"
    from labelwise.cli import main

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(argv(work / "cache_seed_run", cache)) == 0
    folders = [p for p in cache.iterdir() if (p / MANIFEST).is_file()]
    cases = []

    def tampered(name: str, change: Callable[[dict, Path], None]) -> None:
        copy = work / "caches" / name
        shutil.copytree(cache, copy)
        for folder in [p for p in copy.iterdir() if (p / MANIFEST).is_file()]:
            manifest = json.loads((folder / MANIFEST).read_text())
            change(manifest, folder)
            (folder / MANIFEST).write_text(json.dumps(manifest))
        run = work / "cache_runs" / name
        # a corrupt cache is rebuilt (exit 0) -- or refused with one line; both are handled
        cases.append(Case("feature_caches", name, argv(run, copy), False, "", [run],
                          check_ok=lambda: (run / "model.json").is_file()))

    tampered("names_mismatch", lambda m, f: m.__setitem__("names", m["names"][:-1]))
    tampered("shape_mismatch", lambda m, f: m["features"].__setitem__("shape", [1, 2, 3, 4]))
    tampered("escaping_file", lambda m, f: m.__setitem__("attention", {"cls@0": {"file": "../../x.npy",
                                                                                 "shape": [1]}}))
    tampered("truncated_array", lambda m, f: (f / "features.npy").write_bytes((f / "features.npy").read_bytes()[:99]))
    tampered("not_a_dict", lambda m, f: m.clear())
    assert folders, "the seed run wrote no cache"
    return cases


def tiny_model(work: Path) -> Path:
    from labelwise.cli import main

    run = work / "model"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--run-dir", str(run), "--no-report", *_sets(TINY_TRAIN)]) == 0
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=20, help="random cases of each generated kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readers", nargs="+", default=None)
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    random.seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="labelwise_fuzz_"))
    os.environ["LABELWISE_CACHE"] = str(work / "default_cache")
    start = time.perf_counter()
    try:
        from labelwise.models import create_vit
        from labelwise.models.vit_loading import save_vit

        torch.manual_seed(0)
        vit = save_vit(create_vit("custom", 8, embed_dim=32, depth=2, num_heads=2), work / "vit.safetensors")
        model = tiny_model(work)
        n = args.per_kind
        builders: dict[str, Callable[[], list[Case]]] = {
            "images": lambda: image_cases(work, model, rng, n), "masks": lambda: mask_cases(work, model, rng, n // 4),
            "tags": lambda: tag_cases(work, vit, rng, n // 2), "split_lists": lambda: split_cases(work, rng, n // 2),
            "yaml_configs": lambda: yaml_cases(work, rng, n // 2),
            "checkpoints": lambda: checkpoint_cases(work, model, rng), "feature_caches": lambda: cache_cases(work, vit),
        }
        rows = []
        for reader in args.readers or list(builders):
            cases = builders[reader]()
            failures = []
            for case in cases:
                handled, detail = run_case(case)
                if not handled:
                    failures.append(f"{case.name}: {detail}")
            rows.append({"reader": reader, "tried": len(cases), "handled": len(cases) - len(failures),
                         "not_handled": failures})
            print(f"{reader}: {len(cases) - len(failures)}/{len(cases)} handled", flush=True)
            for failure in failures:
                print("   ", failure[:300], flush=True)
        write_results("fuzz_readers", rows, torch.device("cpu"),
                      extra={"per_kind": n, "seed": args.seed, "seconds": round(time.perf_counter() - start, 1)},
                      suffix=args.suffix)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
