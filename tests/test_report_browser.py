"""The report in a real browser: headless Chromium (Debian's ``chromium``, installed by
``.ci/run``) opens the report of a tiny run of each regime; the screenshot is not blank, the
browser logs no console message or failed load, every section is in the rendered DOM, and the
numbers it shows equal the run's own metrics file. Every image embedded in the file decodes."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelwise.report.html import ReportOptions, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Flags for a closed network (no background connections) and a root user (no sandbox).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0"]

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package chromium; "
                                                          ".ci/run installs it): not installed on this machine")]

#: Sections each regime's report must render.
COMMON = ["Provenance", "Metrics", "Confusion matrix", "Best images", "Worst images", "Training curves"]
SECTIONS = {"supervised": COMMON, "semi": COMMON, "unsupervised": [*COMMON, "Cluster → class mapping"],
            "weak": [*COMMON, "Stages", "CAMs and pseudo-masks"]}


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=180, check=False)


def _expected_metrics(run_dir: Path, regime: str) -> dict:
    if regime == "weak":
        return json.loads((run_dir / "weak_run.json").read_text())["final"]
    if regime == "unsupervised":
        return {}  # no eval.json: the report's own pass (checked against evaluate() in test_report.py)
    return json.loads((run_dir / "eval.json").read_text())


@pytest.mark.parametrize("regime", ["supervised", "semi", "unsupervised", "weak"])
def test_report_renders_in_chromium(regime: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    fixture = {"supervised": "tiny_supervised_run", "semi": "tiny_semi_run", "unsupervised": "tiny_cluster_run",
               "weak": "tiny_weak_run"}[regime]
    run_dir: Path = request.getfixturevalue(fixture)
    page = write_report([run_dir], tmp_path / "report.html", ReportOptions(device="cpu", precision="fp32"))
    url = page.resolve().as_uri()

    dom = _chromium(tmp_path / "profile1", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS[regime]:
        assert f"<h3>{section}" in dom.stdout, section
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Failed to load" in line
               or "net::ERR" in line]
    assert console == [], console
    expected = _expected_metrics(run_dir, regime)
    shown = dict(re.findall(r"data-metric=\"(\w+)\">([^<]+)<", dom.stdout))
    for key in ("miou", "pixel_acc"):
        if key in expected:
            assert float(shown[key]) == pytest.approx(expected[key], abs=5e-5), key
    assert "miou" in shown

    shot = tmp_path / "shot.png"
    result = _chromium(tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,1600",
                       "--hide-scrollbars", url)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text, plots, images

    document = page.read_text()
    for uri in re.findall(r"src=['\"](data:[^'\"]+)['\"]", document):
        kind, payload = uri.split(",", 1)
        data = base64.b64decode(payload)
        if kind.startswith("data:image/png"):
            Image.open(io.BytesIO(data)).verify()
        else:
            assert kind.startswith("data:image/svg+xml"), kind
            ET.fromstring(data)
