"""Benchmark hp_speed: seconds, peak memory and value of one Hidden Positives loss step, ours vs the official SupConLoss.

Run from the project root:
`.venv/bin/python benchmarks/hp_speed.py --official /path/to/HP/loss.py` (tens of minutes; the
official loss at 64 images needs far more memory than 16 images: restrict it with
`--official-images 16`). Without `--official` only our rows are measured.

Inputs have the paper's shapes: ``B`` images of 784 (28x28) patches, frozen backbone features
of 384 dims, momentum-head outputs and projections ``z`` / ``z_mix`` of 512 dims, reference
pools of 2048. They are random but structured (unit vectors scattered around 30 random centres
per space, so that hidden positives exist), seeded, identical for both implementations and
L2-normalised as the official ``run.py`` feeds them. ``rho = 1`` (every other patch in every
denominator), so both losses are deterministic and their values comparable; ``lambda``,
``tau`` as given; the LHP term (``z_mix``) is included.

One step is forward + backward of the loss with ``z`` and ``z_mix`` requiring grad; the median
of ``--repeats`` steps after one warm-up step. Each implementation, precision and size runs in
a fresh process of this script (hidden ``--worker`` mode) so that its peak RSS
(``ru_maxrss``, reset after the inputs are built) is its own; a measurement that exceeds
``--timeout`` or ``--memory-limit-gb`` is stopped and its row says so in ``status``.

The official ``loss.py`` is imported unmodified from the given path and run on the CPU: its
one ``.cuda()`` call is made a no-op (``torch.Tensor.cuda`` returns the tensor itself while it
runs) and its ``torch.cuda.amp.autocast`` is inactive without CUDA, so its products are
float32.

``matmul_fraction``: the similarity FLOPs of one step of our loss (8 products of ``2 N^2 d``:
``f.f`` with d = 384, ``m.m``, ``z.z`` and ``z_mix.z_mix`` forward and two gradient products each
for ``z`` and ``z_mix``, d = 512; plus the pool products ``2 N Q (384 + 512)``) divided by our
seconds per step, over the GFLOP/s of a bare ``[4096 x 512] @ [512 x 12544]`` matmul of the row's
precision measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _common import write_results

FEATURE_DIM = 384
HEAD_DIM = 512
CLUSTERS = 30
BASE_TEMPERATURE = 0.07
RHO = 1.0
MATMUL_SHAPE = (4096, 512, 12544)  # [M x K] @ [K x N]
MATMUL_REPEATS = 7
GIB = 1024 ** 3


# ----------------------------------------------------------------------------- worker side

def make_inputs(images: int, patches: int, pool_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Unit vectors around ``CLUSTERS`` random centres (one set of centres per space); ``z_mix``
    is ``z`` plus a little noise, as a mixed code is close to its own patch's code."""
    generator = torch.Generator().manual_seed(seed)
    n = images * patches

    def centres(dim: int) -> torch.Tensor:
        return F.normalize(torch.randn(CLUSTERS, dim, generator=generator), dim=1)

    def around(centre: torch.Tensor, labels: torch.Tensor, noise: float) -> torch.Tensor:
        dim = centre.shape[1]
        x = centre[labels] + noise / math.sqrt(dim) * torch.randn(len(labels), dim, generator=generator)
        return F.normalize(x, dim=1)

    centre_f, centre_m, centre_z = centres(FEATURE_DIM), centres(HEAD_DIM), centres(HEAD_DIM)
    labels = torch.randint(CLUSTERS, (n,), generator=generator)
    pool_labels = torch.randint(CLUSTERS, (pool_size,), generator=generator)
    z = around(centre_z, labels, 1.0)
    z_mix = F.normalize(z + 0.5 / math.sqrt(HEAD_DIM) * torch.randn(n, HEAD_DIM, generator=generator), dim=1)
    return {
        "f": around(centre_f, labels, 1.0),
        "m": around(centre_m, labels, 1.0),
        "z": z,
        "z_mix": z_mix,
        "pool_ag": around(centre_f, pool_labels, 1.0),
        "pool_sp": around(centre_m, pool_labels, 1.0),
    }


def _proc_kib(path: str, field: str) -> int | None:
    """A ``field: <n> kB`` line of a /proc file, in KiB (None when unreadable)."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    return _proc_kib(f"/proc/{pid}/status", field)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (and so ``ru_maxrss``) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_official(path: str) -> Any:
    """The official ``loss.py`` as a module, imported from ``path`` as it is."""
    spec = importlib.util.spec_from_file_location("hp_official_loss", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step_function(spec: dict[str, Any], inputs: dict[str, torch.Tensor], z: torch.Tensor, z_mix: torch.Tensor,
                   stats: dict[str, float]) -> Any:
    if spec["implementation"] == "labelwise":
        from labelwise.losses.hidden_positives import HiddenPositiveLossConfig, hidden_positive_loss

        config = HiddenPositiveLossConfig(temperature=spec["temperature"], base_temperature=BASE_TEMPERATURE,
                                          rho=RHO, precision=spec["precision"])
        generator = torch.Generator().manual_seed(spec["seed"])

        def step() -> torch.Tensor:
            return hidden_positive_loss(z, inputs["f"], inputs["m"], inputs["pool_ag"], inputs["pool_sp"],
                                        lam=spec["lam"], patches_per_image=spec["patches"], z_mix=z_mix,
                                        config=config, generator=generator, stats=stats)
        return step

    official = load_official(spec["official"])
    criterion = official.SupConLoss(temperature=spec["temperature"])
    opt = {"model": {"spatial_size": math.isqrt(spec["patches"])}, "rho": RHO, "loss_version": 1, "reweighting": 1}

    def step() -> torch.Tensor:
        original_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.cuda.amp deprecation, CUDA-unavailable, tensor copy notes
                return criterion(z, modeloutput_s_pr=inputs["m"], modeloutput_f=inputs["f"],
                                 Pool_ag=inputs["pool_ag"], Pool_sp=inputs["pool_sp"], opt=opt, lmbd=spec["lam"],
                                 modeloutput_z_mix=z_mix)
        finally:
            torch.Tensor.cuda = original_cuda  # type: ignore[method-assign]
    return step


def measure_loss(spec: dict[str, Any]) -> dict[str, Any]:
    inputs = make_inputs(spec["images"], spec["patches"], spec["pool_size"], spec["seed"])
    checksum = sum(float(t.double().sum()) + float(t.double().abs().sum()) for t in inputs.values())
    z = inputs["z"].clone().requires_grad_(True)
    z_mix = inputs["z_mix"].clone().requires_grad_(True)
    stats: dict[str, float] = {}
    step = _step_function(spec, inputs, z, z_mix, stats)
    gc.collect()
    rss_before = (_status_kib("VmRSS") or 0) * 1024
    peak_reset = _reset_peak_rss()
    seconds = []
    value = float("nan")
    for _ in range(1 + spec["repeats"]):
        z.grad = None
        z_mix.grad = None
        start = time.perf_counter()
        loss = step()
        loss.backward()
        seconds.append(time.perf_counter() - start)
        value = float(loss.detach())
        del loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if spec.get("grads_path"):
        torch.save({"z": z.grad, "z_mix": z_mix.grad}, spec["grads_path"])
    return {"seconds": seconds[1:], "warmup_seconds": seconds[0], "loss": value, "peak_rss": peak,
            "rss_before": rss_before, "peak_reset": peak_reset, "inputs_checksum": checksum, "stats": stats,
            "torch_threads": torch.get_num_threads()}


def measure_matmul() -> dict[str, Any]:
    """Best achieved GFLOP/s of a bare matmul over the loss's own product shapes (one image of 784
    anchors against 16 images, and MATMUL_SHAPE), after three warm-up calls each: the floor the
    loss is compared with, so taking the best makes ``matmul_fraction`` conservative."""
    generator = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        best: dict[str, Any] = {"gflops": 0.0}
        for m, k, n in ((784, 512, 12544), MATMUL_SHAPE):
            a = torch.randn(m, k, generator=generator).to(dtype)
            b = torch.randn(k, n, generator=generator).to(dtype)
            for _ in range(3):
                torch.mm(a, b)
            seconds = []
            for _ in range(MATMUL_REPEATS):
                start = time.perf_counter()
                torch.mm(a, b)
                seconds.append(time.perf_counter() - start)
            gflops = 2 * m * k * n / statistics.median(seconds) / 1e9
            if gflops > best["gflops"]:
                best = {"seconds": statistics.median(seconds), "gflops": gflops, "shape": [m, k, n]}
        out[precision] = best
    return out


def worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:  # if memory runs out anyway, let the kernel pick this process, not a neighbour
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = measure_matmul() if spec["mode"] == "matmul" else measure_loss(spec)
    Path(spec["result_path"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- parent side

def run_worker(spec: dict[str, Any], workdir: Path, timeout: float, memory_limit: float) -> tuple[str, dict | None]:
    """Run one measurement in a fresh process: ``(status, result)``, status ``ok``, ``timeout``,
    ``memory_limit`` (its RSS passed ``memory_limit`` bytes) or ``failed (exit code ...)``."""
    result_path = workdir / f"result_{time.monotonic_ns()}.json"
    spec = {**spec, "result_path": str(result_path)}
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)])
    start = time.monotonic()
    status = "ok"
    while process.poll() is None:
        rss = (_status_kib("VmRSS", process.pid) or 0) * 1024
        if rss > memory_limit:
            status = "memory_limit"
        elif time.monotonic() - start > timeout:
            status = "timeout"
        if status != "ok":
            process.kill()
            process.wait()
            return status, None
        time.sleep(0.1)
    if process.returncode != 0 or not result_path.exists():
        return f"failed (exit code {process.returncode})", None
    return status, json.loads(result_path.read_text())


def step_flops(n: int, pool_size: int) -> float:
    """Similarity FLOPs of one step of our loss (module docstring)."""
    return 2.0 * n * n * (FEATURE_DIM + 7 * HEAD_DIM) + 2.0 * n * pool_size * (FEATURE_DIM + HEAD_DIM)


def memory_available() -> float:
    kib = _proc_kib("/proc/meminfo", "MemAvailable")
    return kib * 1024 if kib else float("inf")


def loss_row(implementation: str, precision: str, images: int, patches: int, status: str,
             result: dict | None) -> dict[str, Any]:
    row: dict[str, Any] = {"implementation": implementation, "images": images, "patches": patches,
                           "precision": precision, "status": status}
    if result is None:
        return row
    row.update({
        "seconds_per_step": round(statistics.median(result["seconds"]), 4),
        "seconds_all": [round(s, 4) for s in result["seconds"]],
        "warmup_seconds": round(result["warmup_seconds"], 4),
        "peak_rss_gb": round(result["peak_rss"] / GIB, 3),
        "peak_rss_increase_gb": round((result["peak_rss"] - result["rss_before"]) / GIB, 3),
        "loss": result["loss"],
        "torch_threads": result["torch_threads"],
        "inputs_checksum": result["inputs_checksum"],
    })
    if not result["peak_reset"]:
        row["peak_includes_input_building"] = True
    if result["stats"]:
        row["selection_stats"] = {k: round(v, 4) for k, v in result["stats"].items()}
    return row


def gradient_difference(ours: Path, official: Path) -> float:
    a, b = torch.load(ours), torch.load(official)
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in ("z", "z_mix"))
    den = sum(float(b[k].double().norm() ** 2) for k in ("z", "z_mix"))
    return math.sqrt(num / den) if den else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[16, 64], help="batch sizes (images per step)")
    parser.add_argument("--patches", type=int, default=784, help="patches per image (a square: 784 = 28x28)")
    parser.add_argument("--pool-size", type=int, default=2048, help="rows of each reference pool")
    parser.add_argument("--lam", type=float, default=0.5, help="weight of the task-specific positives")
    parser.add_argument("--temperature", type=float, default=0.8, help="tau")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement, after one warm-up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; None: torch's default")
    parser.add_argument("--precisions", nargs="+", choices=["mixed", "bf16", "fp32"], default=["mixed", "bf16", "fp32"],
                        help="our precisions to measure")
    parser.add_argument("--official", default=None,
                        help="path to the official HP repository's loss.py (or the folder holding it); "
                             "without it the official rows are skipped")
    parser.add_argument("--official-images", type=int, nargs="+", default=None,
                        help="batch sizes at which to run the official loss; None: all of --images")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per measurement before it is stopped")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="stop a measurement whose RSS exceeds this; None: 85%% of MemAvailable at start")
    parser.add_argument("--output-suffix", default="", help="results file suffix, e.g. _smoke")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return

    side = math.isqrt(args.patches)
    if side * side != args.patches:
        parser.error(f"--patches must be a square number (the official loss takes a side), got {args.patches}")
    official_images = args.official_images if args.official_images is not None else list(args.images)
    if not set(official_images) <= set(args.images):
        parser.error(f"--official-images {official_images} must be a subset of --images {args.images}")
    official_path = None
    if args.official is not None:
        official_path = Path(args.official).expanduser().resolve()
        if official_path.is_dir():
            official_path = official_path / "loss.py"
        if not official_path.is_file():
            sys.exit(f"--official: no loss.py at {official_path}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    memory_limit = args.memory_limit_gb * GIB if args.memory_limit_gb else 0.85 * memory_available()
    print(f"threads {threads}, memory limit per measurement {memory_limit / GIB:.1f} GB, timeout {args.timeout:.0f} s",
          flush=True)

    rows: list[dict[str, Any]] = []
    base = {"patches": args.patches, "pool_size": args.pool_size, "lam": args.lam, "temperature": args.temperature,
            "repeats": args.repeats, "seed": args.seed, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="hp_speed_") as tmp:
        workdir = Path(tmp)
        status, matmul = run_worker({"mode": "matmul", "threads": args.threads}, workdir, args.timeout, memory_limit)
        if matmul is None:
            sys.exit(f"bare matmul measurement {status}")
        print(f"bare matmul (best of the loss shapes): bf16 {matmul['bf16']['gflops']:.0f} GFLOP/s, "
              f"fp32 {matmul['fp32']['gflops']:.0f} GFLOP/s", flush=True)

        for images in args.images:
            n = images * args.patches
            size_rows = []
            grads: dict[str, Path] = {}
            compare = official_path is not None and images in official_images
            for precision in args.precisions:
                grads[precision] = workdir / f"grads_{images}_{precision}.pt"
                spec = {**base, "mode": "loss", "implementation": "labelwise", "precision": precision,
                        "images": images, "grads_path": str(grads[precision]) if compare else None}
                status, result = run_worker(spec, workdir, args.timeout, memory_limit)
                row = loss_row("labelwise", precision, images, args.patches, status, result)
                if result is not None:
                    flops = step_flops(n, args.pool_size)
                    achieved = flops / row["seconds_per_step"] / 1e9
                    # mixed runs its selection products in fp32: measured against the bf16 floor (conservative)
                    floor = matmul["fp32" if precision == "fp32" else "bf16"]["gflops"]
                    row.update({"step_gflop": round(flops / 1e9, 1), "achieved_gflops": round(achieved, 1),
                                "matmul_gflops": round(floor, 1), "matmul_fraction": round(achieved / floor, 4)})
                size_rows.append(row)
                print(json.dumps(row), flush=True)

            official_row = None
            if official_path is None:
                print(f"official row at {images} images skipped: no --official path to the HP repository's loss.py",
                      flush=True)
            elif images not in official_images:
                print(f"official row at {images} images skipped: not in --official-images {official_images}",
                      flush=True)
            else:
                grads["official"] = workdir / f"grads_{images}_official.pt"
                spec = {**base, "mode": "loss", "implementation": "official", "precision": "fp32",
                        "images": images, "official": str(official_path), "grads_path": str(grads["official"])}
                status, result = run_worker(spec, workdir, args.timeout, memory_limit)
                official_row = loss_row("official", "fp32", images, args.patches, status, result)
                size_rows.append(official_row)
                print(json.dumps(official_row), flush=True)

            if official_row is not None and official_row["status"] == "ok":
                for row in size_rows[:-1]:
                    if row["status"] != "ok":
                        continue
                    if row["inputs_checksum"] != official_row["inputs_checksum"]:
                        print(f"WARNING: inputs differ between labelwise {row['precision']} and official",
                              flush=True)
                    row["relative_difference"] = abs(row["loss"] - official_row["loss"]) / abs(official_row["loss"])
                    row["gradient_relative_difference"] = gradient_difference(grads[row["precision"]],
                                                                              grads["official"])
                    row["speedup"] = round(official_row["seconds_per_step"] / row["seconds_per_step"], 2)
                    print(f"{images} images, {row['precision']}: relative difference "
                          f"{row['relative_difference']:.2e} (gradient {row['gradient_relative_difference']:.2e}), "
                          f"speedup {row['speedup']}x", flush=True)
            for path in grads.values():
                path.unlink(missing_ok=True)
            rows.extend(size_rows)

    extra = {
        "inputs": {"patches": args.patches, "spatial_size": side, "feature_dim": FEATURE_DIM, "head_dim": HEAD_DIM,
                   "pool_size": args.pool_size, "clusters": CLUSTERS, "seed": args.seed, "rho": RHO, "lam": args.lam,
                   "temperature": args.temperature, "base_temperature": BASE_TEMPERATURE, "with_z_mix": True},
        "repeats": args.repeats,
        "relative_difference_target": 1e-3,
        "matmul": {"shape_bf16": matmul["bf16"]["shape"], "shape_fp32": matmul["fp32"]["shape"],
                   "bf16_gflops": round(matmul["bf16"]["gflops"], 1), "fp32_gflops": round(matmul["fp32"]["gflops"], 1)},
        "official": None if official_path is None else {
            "path": str(official_path), "sha256": hashlib.sha256(official_path.read_bytes()).hexdigest(),
            "images": official_images, "products": "fp32 (torch.cuda.amp.autocast inactive on CPU)"},
        "timeout_s": args.timeout,
        "memory_limit_gb": round(memory_limit / GIB, 1),
    }
    write_results("hp_speed", rows, torch.device("cpu"), extra=extra, suffix=args.output_suffix)


if __name__ == "__main__":
    main()
