"""Package layering, read from the source with ``ast`` (no import runs): a regime under
``labelwise.methods`` imports library packages only, never another regime; library packages
never import ``labelwise.methods`` or the CLI; ``errors``, ``io`` and ``config`` sit on the ground
floor."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "labelwise"
LIBRARY = ("config", "data", "engine", "errors", "eval", "features", "io", "losses", "models", "report")
GROUND = {"errors": set(), "io": {"errors", "io"}, "config": {"errors", "io", "config"}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Absolute names of the ``labelwise`` modules ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append(name)
            # ``from labelwise.methods import supervised`` imports the submodule
            found += [f"{name}.{alias.name}" for alias in node.names]
    return [name for name in found if name == "labelwise" or name.startswith("labelwise.")]


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def _regime(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "methods" else None


def test_sources_found():
    names = {_module_name(p) for p in _sources()}
    assert {"labelwise.methods.semi.train", "labelwise.io.atomic", "labelwise.features.cache"} <= names


@pytest.mark.parametrize("path", [p for p in _sources() if _regime(_module_name(p))],
                         ids=lambda p: _module_name(p))
def test_a_regime_imports_no_other_regime(path: Path):
    own = _regime(_module_name(path))
    others = sorted({name for name in _imports(path) if _regime(name) not in (None, own)
                     and _top(name) == "methods"})
    assert not others, f"{path.relative_to(PACKAGE)} imports another regime: {others}"


@pytest.mark.parametrize("path", [p for p in _sources() if _top(_module_name(p)) in LIBRARY],
                         ids=lambda p: _module_name(p))
def test_library_packages_import_no_regime_and_no_cli(path: Path):
    upward = sorted({name for name in _imports(path) if _top(name) == "methods" or _top(name).startswith("cli")})
    assert not upward, f"{path.relative_to(PACKAGE)} imports a regime or the CLI: {upward}"


@pytest.mark.parametrize("path", [p for p in _sources() if _top(_module_name(p)) in GROUND],
                         ids=lambda p: _module_name(p))
def test_ground_floor_imports_only_the_ground_floor(path: Path):
    allowed = GROUND[_top(_module_name(path))]
    bad = sorted({name for name in _imports(path) if name != "labelwise" and _top(name) not in allowed})
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad} (allowed: {sorted(allowed)})"


def test_the_checker_sees_a_cross_regime_import(tmp_path: Path, monkeypatch):
    """The parser resolves both absolute and relative imports (a check that finds nothing would pass)."""
    fake = PACKAGE / "methods" / "semi" / "train.py"
    names = _imports(fake)
    assert "labelwise.engine.segmenter" in names
    source = tmp_path / "x.py"
    source.write_text("from labelwise.methods import supervised\nfrom ..weak import pipeline\n")
    monkeypatch.setattr(ast, "parse", lambda text, _parse=ast.parse: _parse(source.read_text()))
    injected = _imports(fake)
    assert "labelwise.methods.supervised" in injected and "labelwise.methods.weak.pipeline" in injected


def test_default_weights_ship_inside_the_package():
    """A non-editable install carries the default backbone and the U-Net encoder: they live in the
    package folder and pyproject's package-data globs name them (.ci/wheel_check.sh installs the
    wheel and loads them)."""
    import fnmatch

    import tomllib

    from labelwise.models.vit_loading import DEFAULT_BACKBONE_PATH

    assert DEFAULT_BACKBONE_PATH.parent == PACKAGE / "weights" and DEFAULT_BACKBONE_PATH.is_file()
    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["labelwise"]
    for name in ("labelwise_vit.safetensors", "unet_dense_moco.safetensors", "README.md"):
        assert (PACKAGE / "weights" / name).is_file(), name
        assert any(fnmatch.fnmatch(f"weights/{name}", glob) for glob in globs), name
