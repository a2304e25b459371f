"""Benchmark regime_agreement: one short run per regime, to show that a change of the code left
every regime's results unchanged.

Run from the project root: `.venv/bin/python benchmarks/regime_agreement.py --tree DIR --name NAME`
trains the five rows with the labelwise source of DIR (a checkout, e.g. a `git worktree` of an
older commit; default: this one) and its configs, and stores them under NAME in
`results/regime_agreement.json`; `--compare A B` prints whether the rows of A and B agree. Rows
(all on the embedded synthetic data, CPU, fp32, 2 threads, fixed seeds):

- `supervised`: `labelwise train`'s U-Net (width 16), 60 steps;
- `semi`: FixMatch on 4 labeled + 12 unlabeled images (U-Net width 8), 30 steps;
- `weak`: `configs/weak_synthetic.yaml` with 30 classifier steps and a 40-step segmenter;
- `unsupervised`: `configs/unsupervised_synthetic.yaml`, STEGO, 60 steps, then the cluster and
  linear probes;
- `pretrain`: DINO on a tiny ViT (embed 48, depth 2), 4 steps, on 8 generated PNGs.

Each row records the last logged training losses (``metrics.jsonl``) and its final scores; the
rows of two trees agree when every number is equal to 4 decimals. Each row runs in its own
process with ``PYTHONPATH=DIR/src``, so the code measured is DIR's; the snippets use only the
API both layouts share (flat ``steps`` keys, which later versions read at their new place).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from _common import RESULTS, ROOT
from labelwise.io.atomic import atomic_path

OUTPUT = RESULTS / "regime_agreement.json"

COMMON = textwrap.dedent("""
    import json, sys, warnings
    from pathlib import Path
    import torch
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    from labelwise.config import load_config
    work = Path(sys.argv[1]); tree = Path(sys.argv[2])

    def last_losses(run_dir):
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if any(k.startswith("loss") for k in r)][-1]
        return {k: round(float(v), 4) for k, v in sorted(last.items())
                if k.startswith("loss") or k in ("ce", "mlsm", "step")}

    def scores(metrics, keys=("miou", "pixel_acc")):
        return {k: round(float(metrics[k]), 4) for k in keys if k in metrics}
""")

ROWS: dict[str, str] = {
    "supervised": """
        from labelwise.config import TrainConfig
        from labelwise.methods import supervised
        config = load_config(TrainConfig, None, ["data.dataset=synthetic", "data.synthetic_train_images=16",
            "data.synthetic_val_images=8", "data.batch_size=4", "stages.0.steps=60", "stages.0.lr=0.003",
            "model.options={width: 16}", f"run_dir={work / 'run'}", "device=cpu", "precision=fp32",
            "progress=false", "checkpoint_every=1000"])
        result = supervised.train(config)
        print(json.dumps({"losses": last_losses(work / "run"), "scores": scores(result.metrics)}))
    """,
    "semi": """
        from labelwise.data.splits import dataset_names, split_labeled, write_split
        from labelwise.methods.semi import SemiConfig, train
        try:
            from labelwise.data.build import build_datasets
        except ImportError:  # before the package boundaries of issue 22
            from labelwise.methods.common import _build_datasets as build_datasets
        data = ["data.dataset=synthetic", "data.synthetic_train_images=16", "data.synthetic_val_images=8",
                "data.synthetic_size=[32, 48]"]
        names = dataset_names(build_datasets(load_config(SemiConfig, None, [*data, "semi.method=supervised_only"]).data, 0).train)
        labeled, unlabeled = write_split(work / "split", split_labeled(names, count=4, seed=0))
        config = load_config(SemiConfig, None, [*data, f"data.train_list={labeled}", f"semi.unlabeled_list={unlabeled}",
            "semi.method=fixmatch", "semi.threshold=0.5", "data.batch_size=2", "stages.0.steps=30",
            "model.options={width: 8}", f"run_dir={work / 'run'}", "device=cpu", "precision=fp32", "progress=false",
            "checkpoint_every=1000"])
        result = train(config)
        print(json.dumps({"losses": last_losses(work / "run"), "scores": scores(result.metrics)}))
    """,
    "weak": """
        from labelwise.methods import weak
        config = load_config(weak.WeakConfig, tree / "configs" / "weak_synthetic.yaml", ["steps=30",
            f"run_dir={work / 'run'}", "device=cpu", "precision=fp32", "progress=false", "checkpoint_every=1000",
            'segmenter_overrides=["stages.0.steps=40", "data.batch_size=4", "model.options={width: 16}", '
            '"progress=false", "precision=fp32", "device=cpu"]'])
        report = weak.run(config)
        final = report.get("final") or report.get("segmenter") or {}
        print(json.dumps({"losses": last_losses(work / "run"), "segmenter_losses": last_losses(work / "run" / "segmenter"),
                          "pseudo_masks": {k: round(float(v), 4) for k, v in sorted((report.get("pseudo_masks") or {}).items())
                                           if isinstance(v, float)}, "scores": scores(final)}))
    """,
    "unsupervised": """
        from labelwise.methods import unsupervised
        config = load_config(unsupervised.UnsupervisedConfig, tree / "configs" / "unsupervised_synthetic.yaml",
            ["method=stego", "steps=60", f"run_dir={work / 'run'}", f"features.cache_dir={work / 'cache'}",
             "device=cpu", "precision=fp32", "progress=false", "checkpoint_every=1000"])
        result = unsupervised.train(config)
        probe = getattr(unsupervised, "probe", None) or unsupervised.evaluate
        report = probe(result.run_dir, config)
        print(json.dumps({"losses": last_losses(work / "run"),
                          "scores": scores(report, ("miou", "pixel_acc", "linear_miou"))}))
    """,
    "pretrain": """
        import numpy as np
        from PIL import Image
        from labelwise.methods import pretrain
        rng = np.random.default_rng(0)
        (work / "images").mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(work / "images" / f"{i}.png")
        config = load_config(pretrain.PretrainConfig, None, [f"data.images=[{work / 'images'}]", "data.batch_size=4",
            "method=dino", "steps=4", "backbone.arch=custom", "backbone.patch_size=8",
            "backbone.options={embed_dim: 48, depth: 2, num_heads: 3}", "dino.out_dim=64", "dino.hidden_dim=32",
            "dino.bottleneck_dim=16", "multicrop.global_size=32", "multicrop.local_size=16", "multicrop.local_crops=2",
            f"run_dir={work / 'run'}", "device=cpu", "precision=fp32", "progress=false", "log_every=1",
            "checkpoint_every=1000"])
        result = pretrain.train(config)
        print(json.dumps({"losses": last_losses(work / "run"), "scores": {"images_seen": result.summary["images_seen"]}}))
    """,
}


def run_row(tree: Path, name: str) -> dict[str, Any]:
    """Train row ``name`` with the source of ``tree`` in a fresh process; its printed record."""
    with tempfile.TemporaryDirectory(prefix=f"agreement_{name}_") as work:
        code = COMMON + textwrap.dedent(ROWS[name])
        env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS="2")
        done = subprocess.run([sys.executable, "-c", code, work, str(tree)], capture_output=True, text=True,
                              env=env, cwd=tree, check=False)
        if done.returncode != 0:
            raise SystemExit(f"row {name} with {tree}: exit {done.returncode}\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def _numbers(record: Any, prefix: str = "") -> dict[str, float]:
    if isinstance(record, dict):
        out: dict[str, float] = {}
        for key, value in record.items():
            out.update(_numbers(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): float(record)}


def compare(results: dict[str, Any], a: str, b: str) -> bool:
    """Print each row's numbers of ``a`` and ``b``; whether all agree to 4 decimals."""
    agree = True
    for row in ROWS:
        left, right = _numbers(results[a]["rows"].get(row, {})), _numbers(results[b]["rows"].get(row, {}))
        for key in sorted(set(left) | set(right)):
            same = key in left and key in right and round(left[key], 4) == round(right[key], 4)
            agree &= same
            print(f"{row:13s} {key:34s} {left.get(key, float('nan')):>10.4f} {right.get(key, float('nan')):>10.4f}"
                  f"  {'same' if same else 'DIFFERENT'}")
    print("all rows agree" if agree else "some rows differ")
    return agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose src/ and configs/ are measured")
    parser.add_argument("--name", default=None, help="key of these rows in the results file (default: the "
                        "tree's commit)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two stored names and exit")
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(OUTPUT.read_text()) if OUTPUT.is_file() else {}
    if args.compare:
        raise SystemExit(0 if compare(results, *args.compare) else 1)
    tree = args.tree.resolve()
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "src", "configs"],
                                capture_output=True, text=True, check=False).stdout.strip())
    name = args.name or commit[:7]
    entry = results.get(name, {"rows": {}})
    entry.update({"commit": commit, "uncommitted_changes": dirty, "date": datetime.date.today().isoformat(),
                  "command": "python " + " ".join(sys.argv)})
    results[name] = entry
    RESULTS.mkdir(parents=True, exist_ok=True)
    for row in args.rows:  # the file is written after each row: a failed row keeps the others
        entry["rows"][row] = run_row(tree, row)
        print(row, json.dumps(entry["rows"][row]), flush=True)
        with atomic_path(OUTPUT) as tmp:
            tmp.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
