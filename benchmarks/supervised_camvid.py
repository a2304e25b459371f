"""Benchmark supervised_camvid: train unet on camvid with `configs/camvid_unet.yaml`, evaluate on the held-out split, write results/supervised_camvid.json.

Run from the project root: `.venv/bin/python benchmarks/supervised_camvid.py` (about an hour on 2 CPU cores).
"""

from _supervised import run

if __name__ == "__main__":
    run("supervised_camvid", "unet", "camvid", "camvid", __doc__.split("\n")[0], "configs/camvid_unet.yaml")
