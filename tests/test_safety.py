"""Safety rules of the source, checked on its syntax tree, and paths from user files that must
not leave their folder.

Rules: every ``torch.load`` passes ``weights_only=True``; nothing calls ``pickle.load(s)``,
``marshal.loads``, ``eval``, ``exec``, ``yaml.load`` / ``yaml.unsafe_load`` or ``np.load`` with
``allow_pickle=True``; no ``subprocess`` call uses ``shell=True``.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from labelwise.data.classmap import ClassMap
from labelwise.data.splits import read_name_list
from labelwise.data.tags import read_tag_file
from labelwise.errors import CheckpointError, DataError
from labelwise.io import checkpoint as ckpt

SOURCE = Path(__file__).resolve().parents[1] / "src" / "labelwise"


def _calls() -> list[tuple[Path, ast.Call, str]]:
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                found.append((path, node, ast.unparse(node.func)))
    return found


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_the_scan_sees_the_source() -> None:
    names = {name for _, _, name in _calls()}
    assert len(names) > 500 and "torch.load" in names and "yaml.safe_load" in names


def test_torch_load_always_passes_weights_only_true() -> None:
    def weights_only(call: ast.Call) -> bool:
        value = _keyword(call, "weights_only")
        return isinstance(value, ast.Constant) and value.value is True

    bad = [f"{p.relative_to(SOURCE)}:{c.lineno}" for p, c, name in _calls()
           if name.endswith("torch.load") and not weights_only(c)]
    assert not bad, f"torch.load without weights_only=True: {bad}"


@pytest.mark.parametrize("forbidden", ["pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads", "eval",
                                       "exec", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "dill.load",
                                       "cloudpickle.load", "os.system"])
def test_no_call_runs_code_from_data(forbidden: str) -> None:
    bad = [f"{p.relative_to(SOURCE)}:{c.lineno}" for p, c, name in _calls() if name == forbidden]
    assert not bad, f"{forbidden} called at {bad}"


def test_no_numpy_pickles_and_no_shell_commands() -> None:
    bad = [f"{p.relative_to(SOURCE)}:{c.lineno} {name}" for p, c, name in _calls()
           if (name.endswith(("np.load", "numpy.load")) and isinstance(_keyword(c, "allow_pickle"), ast.Constant)
               and _keyword(c, "allow_pickle").value is True)
           or (name.startswith("subprocess.") and isinstance(_keyword(c, "shell"), ast.Constant)
               and _keyword(c, "shell").value is True)]
    assert not bad, bad


# ----------------------------------------------------------------------------- paths from user files


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "s0/../../../x", "./s0", "s0/"])
def test_name_lists_never_reach_outside_the_dataset(tmp_path: Path, entry: str) -> None:
    path = tmp_path / "list.txt"
    path.write_text(f"s1\n{entry}\n")
    with pytest.raises(DataError, match=r"list\.txt:2: .* is not a sample of the dataset"):
        read_name_list(path, ["s0", "s1"])


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "img0/../../x"])
def test_tag_files_never_reach_outside_the_images(tmp_path: Path, entry: str) -> None:
    classes = ClassMap.from_names(["a", "b"])
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"img0": ["a"], "img1": ["b"], entry: ["a"]}))
    with pytest.raises(DataError, match=r"tags\.json: tags for 1 image\(s\) that are not among the images"):
        read_tag_file(path, classes, ["img0", "img1"])


def test_a_checkpoint_pointer_cannot_leave_the_checkpoint_folder(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    state = ckpt.TrainingCheckpoint(1, model.state_dict(), torch.optim.SGD(model.parameters(), lr=0.1).state_dict(),
                                    {}, [ckpt.capture_rng_state()])
    ckpt.save_training_checkpoint(tmp_path, state)
    outside = tmp_path.parent / "outside_step"
    outside.mkdir(exist_ok=True)
    for name in ("../../outside_step", str(outside), "step_0000001/../../../outside_step"):
        (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "dir": name}))
        with pytest.warns(UserWarning, match="corrupt or stale pointer"):
            assert ckpt.latest_checkpoint_dir(tmp_path) == tmp_path / "checkpoints" / "step_0000001"
    for child in (tmp_path / "checkpoints").glob("step_*"):
        for file in child.iterdir():
            file.unlink()
        child.rmdir()
    with pytest.raises(CheckpointError, match=r"latest\.json: names no checkpoint folder"):
        ckpt.latest_checkpoint_dir(tmp_path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    from labelwise.models.vit_loading import load_vit

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):  # noqa: ANN204
            return (Path.mkdir, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload(), "weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load"):
        load_vit(str(path))
    assert not marker.exists()
    np.save(tmp_path / "array.npy", np.zeros(3))  # plain arrays stay loadable without pickle
    assert np.load(tmp_path / "array.npy", allow_pickle=False).shape == (3,)
