#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it into a clean venv (no source tree
# on the path, run from an empty folder) and run the demo (every regime + its report) and the default
# backbone from it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" .
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet torch==2.13.0
"$work/venv/bin/python" -m pip install --quiet "$work"/dist/labelwise-*.whl
mkdir "$work/cwd"
cd "$work/cwd"
"$work/venv/bin/labelwise" demo --steps 30 --run-dir demo --no-progress
"$work/venv/bin/python" - <<'PY'
import labelwise
from labelwise.models.vit_loading import load_vit, resolve_backbone

source = labelwise.__file__
assert "site-packages" in source, f"labelwise imported from {source}, not from the installed wheel"
path = resolve_backbone("labelwise_default")
assert path.is_file() and "site-packages" in str(path), path
vit = load_vit("labelwise_default")
predictor = labelwise.load("demo/supervised")
from pathlib import Path

assert Path("demo/report.html").is_file(), "the demo's comparison report is missing"
print(f"wheel check: labelwise from {source}; default backbone {path} ({vit.config.arch}); "
      f"demo model predicts {list(predictor.class_map.names)}; demo/report.html written")
PY
