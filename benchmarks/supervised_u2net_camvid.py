"""Benchmark supervised_u2net_camvid: train u2net_small on camvid with `configs/camvid_u2net_small.yaml`, evaluate on the held-out split, write results/supervised_u2net_camvid.json.

Run from the project root: `.venv/bin/python benchmarks/supervised_u2net_camvid.py` (about an hour on 2 CPU cores).
"""

from _supervised import run

if __name__ == "__main__":
    run("supervised_u2net_camvid", "u2net_small", "camvid", "camvid", __doc__.split("\n")[0], "configs/camvid_u2net_small.yaml")
