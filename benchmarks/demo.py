"""Benchmark demo: `labelwise demo` end to end, timed (issue 25's target: <= 5 minutes on 2 CPU
cores for the four regimes and the comparison report).

Run from the project root: `.venv/bin/python benchmarks/demo.py` (default 300 steps, the README's
`make demo`). It runs the demo in a fresh temporary folder as a subprocess (the command a user
types, including interpreter start-up and imports) and writes `benchmarks/results/demo.json`:
one row per regime (`regime`, `seconds`, `miou`) and a `total` row with the wall-clock seconds of
the whole command and whether it met the target.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, write_results

TARGET_SECONDS = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="the demo's --steps")
    args = parser.parse_args()
    labelwise = Path(sys.executable).with_name("labelwise")
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = subprocess.run([str(labelwise), "demo", "--run-dir", str(Path(folder) / "demo"), "--steps",
                                 str(args.steps), "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                                check=True)
        wall = time.perf_counter() - start
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    rows = [{"regime": regime, "seconds": summary["seconds"][regime], "miou": round(summary["miou"][regime], 4)}
            for regime in summary["seconds"]]
    rows.append({"regime": "total", "seconds": round(wall, 1), "target_seconds": TARGET_SECONDS,
                 "met": wall <= TARGET_SECONDS})
    write_results("demo", rows, torch.device("cpu"), extra={"steps": args.steps})


if __name__ == "__main__":
    main()
