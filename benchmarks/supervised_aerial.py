"""Benchmark supervised_aerial: train unet on dubai_aerial with `configs/aerial_unet.yaml`, evaluate on the held-out split, write results/supervised_aerial.json.

Run from the project root: `.venv/bin/python benchmarks/supervised_aerial.py` (about an hour on 2 CPU cores).
"""

from _supervised import run

if __name__ == "__main__":
    run("supervised_aerial", "unet", "dubai_aerial", "dubai_aerial", __doc__.split("\n")[0], "configs/aerial_unet.yaml")
