"""Benchmark pretrain_dino: self-supervised pretraining of the project's default ViT backbone.

Run from the project root: `.venv/bin/python benchmarks/pretrain_dino.py` (about 90 minutes on 2
CPU cores). It runs `labelwise pretrain --config configs/pretrain_vit_tiny.yaml` into
`benchmarks/runs/pretrain_dino/` (resumable: run the same command again after an interruption),
copies the exported teacher to `src/labelwise/weights/labelwise_vit.safetensors` (the offline default backbone,
`--no-export` to leave it alone) and writes `benchmarks/results/pretrain_dino.json` with one row:
arch, patch, images, epochs, train_seconds, checkpoint. The data are the unlabeled photographs
of `../shared/data/unlabeled` plus the images (never the labels) of CamVid train+val and the
Dubai aerial tiles, as listed in the config.

The default backbone has two stages (`benchmarks/_common.DEFAULT_BACKBONE_STAGES`): this command
with `--no-export`, then `--config configs/pretrain_vit_tiny_continue.yaml --run-dir
benchmarks/runs/pretrain_dino_continue --suffix _continue`, which continues the first stage's
export (the config's `init`) and writes the weights file.

The same script records the U-Net encoder pretraining of the semi-supervised `+ssl` rows:
`--config configs/pretrain_unet_dense_moco.yaml --run-dir benchmarks/runs/pretrain_unet --no-export
--name pretrain_unet` (writes `benchmarks/results/pretrain_unet.json`).

Afterwards: `benchmarks/probe_camvid.py` (probe numbers of the exported backbone) and
`benchmarks/attention_figures.py` (class-token attention PNGs of 4 CamVid images).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _common import ROOT, require_data, write_results
from labelwise.config import load_config
from labelwise.engine.runtime import resolve_device
from labelwise.io.atomic import atomic_path
from labelwise.methods.pretrain import PretrainConfig, train
from labelwise.models.vit_loading import DEFAULT_BACKBONE_PATH


def project_relative(path: str | Path) -> str:
    """``path`` relative to the project root when it lies inside it, else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "pretrain_vit_tiny.yaml",
                        help="pretraining config (default: configs/pretrain_vit_tiny.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. --set stages.0.steps=300)")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "benchmarks" / "runs" / "pretrain_dino",
                        help="run folder (default: benchmarks/runs/pretrain_dino)")
    parser.add_argument("--export", type=Path, default=DEFAULT_BACKBONE_PATH,
                        help="where the pretrained backbone is copied (default: src/labelwise/weights/labelwise_vit.safetensors)")
    parser.add_argument("--no-export", action="store_true", help="do not write --export")
    parser.add_argument("--fresh", action="store_true", help="discard an unfinished run in --run-dir instead of "
                        "resuming it")
    parser.add_argument("--suffix", default="", help="results file suffix, e.g. _gpu")
    parser.add_argument("--name", default="pretrain_dino", help="results name (default: pretrain_dino)")
    args = parser.parse_args()
    for name in ("unlabeled", "camvid", "dubai_aerial"):
        require_data(name)

    config = load_config(PretrainConfig, args.config, [*args.overrides, f"run_dir={args.run_dir}"])
    # Relative data folders in the config are relative to the project root.
    config.data.images = [str((ROOT / p).resolve()) if not Path(p).is_absolute() else p for p in config.data.images]
    if config.init is not None and not Path(config.init).is_absolute():
        config.init = str((ROOT / config.init).resolve())
    checkpoints = args.run_dir / "checkpoints"
    resume = not args.fresh and checkpoints.is_dir() and any(checkpoints.iterdir())
    result = train(config, resume=resume, overwrite=args.fresh)
    if result.backbone_path is None:
        raise SystemExit(f"{args.run_dir}: the run did not finish; run the same command again to resume it")

    export = None
    if not args.no_export:  # the run's weights.safetensors is already a save_vit file: copy it atomically
        export = Path(args.export)
        export.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(export) as tmp:
            shutil.copyfile(result.backbone_path, tmp)
        print(f"wrote {export}")
    summary = result.summary
    backbone = config.backbone
    vit = backbone.kind == "vit"
    local_crops = config.multicrop.local_crops if config.method == "dino" else 0
    row = {
        "backbone": backbone.kind,
        "arch": backbone.arch if vit else None,
        "patch": backbone.patch_size if vit else None,
        "options": backbone.options,
        "method": config.method + ("+ibot" if config.method == "dino" and config.dino.ibot else ""),
        "images": summary["images"],
        "steps": summary["steps"],
        "batch_size": summary["batch_size"],
        "images_seen": summary["images_seen"],
        "epochs": round(summary["epochs"], 3),
        "train_seconds": round(summary["train_seconds"], 1),
        "images_per_second": round(summary["images_per_second"], 2),
        "global_size": config.multicrop.global_size,
        "local_crops": local_crops,
        "local_size": config.multicrop.local_size if local_crops else None,
        "resumed": resume,
        "init": project_relative(config.init) if config.init else None,
        "last_logs": {k: round(v, 4) for k, v in summary["last_logs"].items()},
        "checkpoint": project_relative(export or result.backbone_path),
    }
    write_results(args.name, [row], resolve_device(config.device),
                  extra={"config": project_relative(args.config), "overrides": args.overrides}, suffix=args.suffix)


if __name__ == "__main__":
    main()
