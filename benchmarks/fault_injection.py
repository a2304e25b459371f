"""Fault injection (issue 26): kill runs at random moments, fill the disk, resume, compare.

For every regime a tiny synthetic run is trained once without interruption (the reference).
Then, per trial, the same command is started in a fresh folder and sent SIGKILL at a random
moment (uniform between interpreter start-up and the reference's wall time), the folder is inspected for
half-written artifacts taken as complete, and the command is run again with ``--resume`` to the
end. A trial is ``recovered`` when that resume exits 0 with the final model written,
``identical`` when the final weights equal the reference's bit for bit (CPU), ``lost`` when it is
not recovered or any half-written artifact was found (checkpoints, model folders, feature
caches, pseudo-mask folders, reports).

Write failures: the same commands under a file-size limit (``RLIMIT_FSIZE``, half the largest
file of the reference run: the write fails with EFBIG) and, where this process may mount one, on
a tmpfs too small for the run (ENOSPC, then remounted larger); each must end with exit status 2
and one line naming the file, keep the previous checkpoint, and resume to the same weights.

    .venv/bin/python benchmarks/fault_injection.py                      # 20 kills per regime
    .venv/bin/python benchmarks/fault_injection.py --regimes supervised --trials 3 --suffix _quick

Results: ``benchmarks/results/fault_injection.json`` (rows ``regime``, ``fault``, ``trials``,
``identical``, ``recovered``, ``lost``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from _common import ROOT, write_results

SYNTHETIC = ["data.dataset=synthetic", "data.synthetic_train_images=12", "data.synthetic_val_images=4",
             "data.synthetic_size=[32, 48]", "data.synthetic_classes=4"]
RUN = ["device=cpu", "progress=false", "precision=fp32", "log_every=1"]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@dataclass
class Regime:
    """A CLI command (without ``--run-dir`` / ``--resume``) and the file holding its final weights."""

    name: str
    args: Callable[[Path], list[str]]
    final: str
    report: bool = False
    """Write ``report.html`` at the end (the command's default) instead of ``--no-report``."""

    def command(self, trial: Path, run_dir: Path) -> list[str]:
        return [*self.args(trial), "--run-dir", str(run_dir), *([] if self.report else ["--no-report"])]


def _tiny_vit(path: Path, depth: int) -> Path:
    import torch

    from labelwise.models import create_vit
    from labelwise.models.vit_loading import save_vit

    if not path.exists():
        torch.manual_seed(0)
        save_vit(create_vit("custom", 8, embed_dim=32, depth=depth, num_heads=2), path)
    return path


def _assets(work: Path) -> dict[str, Path]:
    """Files every trial shares (read-only): tiny ViTs, an image folder, semi split lists."""
    import numpy as np
    from PIL import Image

    from labelwise.config import load_config
    from labelwise.data.build import build_datasets
    from labelwise.data.splits import dataset_names, split_labeled, write_split
    from labelwise.data.synthetic import SyntheticShapes
    from labelwise.methods.semi import SemiConfig

    assets = {"vit1": _tiny_vit(work / "vit1.safetensors", 1), "vit2": _tiny_vit(work / "vit2.safetensors", 2)}
    images = work / "images"
    if not images.is_dir():
        images.mkdir(parents=True)
        for index, sample in enumerate(SyntheticShapes(num_images=16, size=(48, 48), num_classes=4, seed=5)):
            array = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(images / f"{index:03d}.png")
    assets["images"] = images
    semi = load_config(SemiConfig, None, [*SYNTHETIC, "semi.method=supervised_only"])
    names = dataset_names(build_datasets(semi.data).train)
    assets["labeled"], assets["unlabeled"] = write_split(work / "split", split_labeled(names, count=4, seed=0))
    return assets


def regimes(assets: dict[str, Path]) -> dict[str, Regime]:
    unet = "model.options={width: 8, depth: 2}"
    return {
        "supervised": Regime("supervised", lambda trial: [
            "train", *_sets([*SYNTHETIC, *RUN, unet, "stages.0.steps=16", "data.batch_size=4", "checkpoint_every=2"])],
            "weights.safetensors"),
        "supervised_report": Regime("supervised_report", lambda trial: [
            "train", *_sets([*SYNTHETIC, *RUN, unet, "stages.0.steps=16", "data.batch_size=4", "checkpoint_every=2"])],
            "weights.safetensors", report=True),
        "pretrain": Regime("pretrain", lambda trial: [
            "pretrain", "--images", str(assets["images"]), "--method", "dino", "--steps", "12",
            *_sets([*RUN, "checkpoint_every=2", "data.batch_size=4", "backbone.arch=custom", "backbone.patch_size=8",
                    "backbone.options={embed_dim: 32, depth: 2, num_heads: 2}", "multicrop.global_size=32",
                    "multicrop.local_size=16", "multicrop.local_crops=2", "dino.out_dim=64", "dino.hidden_dim=32",
                    "dino.bottleneck_dim=16", "dino.patch_out_dim=64"])],
            "weights.safetensors"),
        "unsupervised": Regime("unsupervised", lambda trial: [
            "unsupervised", "train", *_sets([
                *SYNTHETIC, *RUN, f"features.backbone={assets['vit1']}", "features.crop_mode=whole",
                "features.crop_size=32", f"features.cache_dir={trial / 'cache'}", "method=stego", "stages.0.steps=16",
                "batch_size=4", "checkpoint_every=2", "eval.clusters=4", "eval.linear_probe=false"])],
            "weights.safetensors"),
        "weak": Regime("weak", lambda trial: [
            "weak", "run", *_sets([
                *SYNTHETIC, *RUN, f"backbone={assets['vit2']}", "image_size=[32, 48]", "stages.0.steps=8",
                "batch_size=4", "checkpoint_every=2", "cams.blocks=2", "pseudo_masks.background_class=0",
                'segmenter_overrides=["stages.0.steps=8", "data.batch_size=2", "model.options={width: 8}", '
                '"checkpoint_every=2"]'])],
            "segmenter/weights.safetensors"),
        "semi_self_training": Regime("semi_self_training", lambda trial: [
            "semi", "train", *_sets([
                *SYNTHETIC, *RUN, unet, f"data.train_list={assets['labeled']}",
                f"semi.unlabeled_list={assets['unlabeled']}", "semi.method=self_training", "semi.rounds=2",
                "stages.0.steps=6", "data.batch_size=2", "checkpoint_every=2"])],
            "weights.safetensors"),
    }


# ----------------------------------------------------------------------------- running


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_cli(args: list[str], kill_after: float | None = None, file_size_limit: int | None = None
            ) -> tuple[int | None, str, float]:
    """Run ``labelwise args``; returns (exit status or None when killed, stderr, seconds)."""
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([sys.executable, "-m", "labelwise", *args], stdout=subprocess.DEVNULL,
                                   stderr=err, env=_env(), preexec_fn=limit if file_size_limit else None)
        try:
            code: int | None = process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            code = None
        err.seek(0)
        return code, err.read(), time.perf_counter() - start


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def half_written(run_dir: Path) -> list[str]:
    """Artifacts in ``run_dir`` that claim to be complete but are not (each as one line)."""
    from PIL import Image

    from labelwise.errors import LabelwiseError
    from labelwise.features.store import FeatureCache
    from labelwise.io.checkpoint import latest_checkpoint_dir, load_training_checkpoint
    from labelwise.models.artifact import read_artifact_files

    found: list[str] = []
    for info in run_dir.rglob("model.json"):
        if (info.parent / "weights.safetensors").is_file():
            try:
                read_artifact_files(info.parent)
            except LabelwiseError as exc:
                found.append(f"model folder {info.parent}: {exc}")
    for pointer in run_dir.rglob("checkpoints/latest.json"):
        try:
            folder = latest_checkpoint_dir(pointer.parent.parent)
            if folder is not None:
                load_training_checkpoint(folder)
        except LabelwiseError as exc:
            found.append(f"checkpoint {pointer}: {exc}")
    for manifest in run_dir.rglob("manifest.json"):
        if manifest.parent.name.startswith("."):
            continue  # a staging folder: never opened as a cache
        try:
            FeatureCache.open(manifest.parent)
        except LabelwiseError as exc:
            found.append(f"feature cache {manifest.parent}: {exc}")
    for report in [*run_dir.rglob("pseudo_masks.json"), *run_dir.rglob("pseudo_labels.json")]:
        for image in report.parent.rglob("*.png"):
            try:
                with Image.open(image) as img:
                    img.load()
            except OSError as exc:
                found.append(f"pseudo-mask folder {report.parent}: {image.name} {exc}")
    for html in run_dir.rglob("report.html"):
        if not html.read_text(errors="replace").rstrip().endswith("</html>"):
            found.append(f"report {html}: cut short")
    return found


def _one_error_line(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and "warning:" not in line
            and not line.startswith(("train:", "pretrain:"))]


# ----------------------------------------------------------------------------- faults


def startup_seconds() -> float:
    """Wall time of interpreter start-up and imports before a command does any work (the
    fastest of three), so that kills land where the run writes."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import labelwise.cli, torch, labelwise.methods.supervised"],
                       env=_env(), check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def interrupted(run_dir: Path) -> str:
    """What the killed run had written: the stage a kill interrupted."""
    if not run_dir.exists():
        return "before the run folder"
    checkpoints = [p for p in run_dir.rglob("checkpoints/step_*") if p.is_dir()]
    if any(run_dir.rglob("model.json")):
        return "after an export"
    if checkpoints:
        return "between checkpoints"
    return "before the first checkpoint"


def sigkill_trials(regime: Regime, work: Path, reference: Path, seconds: float, startup: float, trials: int,
                   rng: random.Random) -> dict:
    identical = recovered = lost = killed = 0
    notes: list[str] = []
    stages: dict[str, int] = {}
    for trial in range(trials):
        folder = work / f"{regime.name}_kill{trial}"
        shutil.rmtree(folder, ignore_errors=True)
        run_dir = folder / "run"
        args = regime.command(folder, run_dir)
        kill_at = rng.uniform(min(startup, 0.9 * seconds), seconds)
        code, err, _ = run_cli(args, kill_after=kill_at)
        killed += code is None
        stage = interrupted(run_dir) if code is None else "not killed (finished first)"
        stages[stage] = stages.get(stage, 0) + 1
        broken = half_written(run_dir) if run_dir.exists() else []
        code, err, _ = run_cli([*args, "--resume"])
        ok = code == 0 and (run_dir / regime.final).is_file()
        recovered += ok
        same = ok and same_weights(run_dir / regime.final, reference / regime.final)
        identical += same
        lost += (not ok) or bool(broken)
        if broken or not ok or not same:
            notes.append(f"trial {trial} (kill at {kill_at:.1f} s): {'; '.join(broken)} "
                         f"{'' if ok else 'resume failed: ' + err.strip()[-300:]}{'' if same else ' weights differ'}")
        print(f"  {regime.name} kill {trial} at {kill_at:.1f} s: recovered {ok}, identical {same}, "
              f"half-written {len(broken)}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return {"regime": regime.name, "fault": "sigkill", "trials": trials, "killed_before_end": killed,
            "identical": identical, "recovered": recovered, "lost": lost, "killed_when": stages, "notes": notes}


def write_failure_trial(regime: Regime, work: Path, reference: Path, fault: str) -> dict:
    folder = work / f"{regime.name}_{fault}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    largest = max(p.stat().st_size for p in reference.rglob("*") if p.is_file())
    mounted = False
    if fault == "disk_full_tmpfs":
        total = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
        size_kib = max(64, int(total * 0.6) // 1024)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
        if not mounted:
            return {"regime": regime.name, "fault": fault, "trials": 0, "identical": 0, "recovered": 0, "lost": 0,
                    "notes": ["tmpfs could not be mounted here (not root): row not measured"]}
    try:
        run_dir = folder / "run"
        args = regime.command(folder, run_dir)
        code, err, _ = run_cli(args, file_size_limit=largest // 2 if fault == "file_size_limit" else None)
        lines = _one_error_line(err)
        clear = code == 2 and len(lines) == 1 and "Traceback" not in err and str(folder) in lines[0]
        broken = half_written(run_dir) if run_dir.exists() else []
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=1g", str(folder)], check=True)
        code2, err2, _ = run_cli([*args, "--resume"])
        ok = code2 == 0 and (run_dir / regime.final).is_file()
        same = ok and same_weights(run_dir / regime.final, reference / regime.final)
        print(f"  {regime.name} {fault}: exit {code}, one clear line {clear}, recovered {ok}, identical {same}",
              flush=True)
        return {"regime": regime.name, "fault": fault, "trials": 1, "identical": int(same), "recovered": int(ok),
                "lost": int((not ok) or bool(broken)), "exit_status": code, "one_line_error": clear,
                "error": lines[0] if lines else err.strip()[-400:], "half_written": broken,
                **({} if ok else {"resume_error": err2.strip()[-400:]})}
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", nargs="+", default=None,
                        help="default: all but supervised_report (the supervised run writing its report.html)")
    parser.add_argument("--trials", type=int, default=20, help="SIGKILL trials per regime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-disk", action="store_true", help="skip the write-failure rows")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="labelwise_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    assets = _assets(work)
    chosen = regimes(assets)
    names = args.regimes or [name for name in chosen if name != "supervised_report"]
    rng = random.Random(args.seed)
    rows = []
    start = time.perf_counter()
    startup = startup_seconds()
    for name in names:
        regime = chosen[name]
        reference = work / f"{name}_reference" / "run"
        shutil.rmtree(reference.parent, ignore_errors=True)
        code, err, seconds = run_cli(regime.command(reference.parent, reference))
        if code != 0:
            raise SystemExit(f"{name}: the uninterrupted reference run failed:\n{err}")
        print(f"{name}: reference run {seconds:.1f} s (start-up {startup:.1f} s)", flush=True)
        row = sigkill_trials(regime, work, reference, seconds, startup, args.trials, rng)
        row["reference_seconds"] = round(seconds, 1)
        row["startup_seconds"] = round(startup, 1)
        rows.append(row)
        if not args.no_disk:
            for fault in ("file_size_limit", "disk_full_tmpfs"):
                rows.append(write_failure_trial(regime, work, reference, fault))
        extra = {"trials_per_regime": args.trials, "seed": args.seed,
                 "seconds": round(time.perf_counter() - start, 1)}
        write_results("fault_injection", rows, torch.device("cpu"), extra=extra, suffix=args.suffix)
    shutil.rmtree(work, ignore_errors=True) if args.work is None else None


if __name__ == "__main__":
    main()
