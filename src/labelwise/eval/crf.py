"""Fully connected (dense) CRF post-processing of per-pixel class probabilities.

What it is for
--------------
Unsupervised and weakly supervised predictions are coarse: cluster assignments come from
patch features (one decision per 8-16 px patch) and class activation maps are blurry. The
dense CRF of Krähenbühl & Koltun (2011) sharpens such probability maps so that label
boundaries follow color edges of the image. It is the optional post-processing step of the
evaluation protocol (DESIGN.md, "Evaluation protocol") for cluster probabilities of
unsupervised methods and for CAM-derived pseudo-masks (weak supervision). The mean-field
inference is done by ``pydensecrf2`` (import name ``pydensecrf``) on the CPU.

Model
-----
Unary: ``-log(clip(p, 1e-5, 1))`` of the given probabilities ``p`` (``unary_from_softmax``).
Pairwise (Potts compatibility, symmetric normalisation, diagonal kernels):

- Gaussian (smoothness) kernel ``gaussian_compat * exp(-|Δxy|² / (2 gaussian_sxy²))``:
  removes isolated pixels;
- bilateral (appearance) kernel
  ``bilateral_compat * exp(-|Δxy|² / (2 bilateral_sxy²) - |ΔRGB|² / (2 bilateral_srgb²))``:
  nearby pixels of similar color take the same label.

``iterations`` mean-field steps follow (0 returns the renormalised clipped input). The
defaults of :class:`CRFParams` are those of DESIGN.md (10 iterations; Gaussian sxy 1, compat
3; bilateral sxy 67, srgb 3, compat 4). ``sxy`` is in pixels of the image given, so apply the
CRF at the resolution the parameters were chosen for (the usual one: full image resolution).

Parallelism and timeouts
------------------------
:func:`dense_crf` refines one image in the calling process. :func:`crf_refine_batch` (and
:func:`crf_labels`) refine many images in worker processes of a
``concurrent.futures.ProcessPoolExecutor`` created for the call. Workers are started with the
``forkserver`` method (``spawn`` where forkserver does not exist), never ``fork``: forking a
process that runs torch's thread pools can deadlock. The fork server preloads this module so
workers of later calls start in milliseconds (the first call pays one interpreter start and the
import of torch/pydensecrf in the server).

The whole call has one deadline, ``timeout`` seconds after it starts. If results are still
missing then, the pool is shut down with pending work cancelled and every worker process is
killed (``SIGKILL``) and reaped -- ``executor.shutdown(cancel_futures=True)`` alone would let a
running worker go on -- and :class:`CRFTimeoutError` says how many images were unfinished. So
the call cannot hang on a stuck worker; size the batches so that ``timeout`` is generous (one
360x480 image with 11 classes takes on the order of a second per worker). ``workers=0`` runs
everything in the calling process, without any timeout.

Test hook: the environment variable ``LABELWISE_CRF_TEST_SLEEP`` (seconds, float) makes each
worker sleep that long before refining. It exists only for the timeout test. It is read by
:func:`crf_refine_batch` in the calling process and handed to the workers (a fork server's
environment is frozen when the server starts), and is ignored for ``workers=0``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from labelwise.errors import ConfigError, LabelwiseError

__all__ = ["CRFParams", "CRFTimeoutError", "crf_labels", "crf_refine_batch", "dense_crf"]

TEST_SLEEP_ENV = "LABELWISE_CRF_TEST_SLEEP"
"""Test-only: seconds every worker of :func:`crf_refine_batch` sleeps before working."""

_KILL_JOIN_SECONDS = 10.0


class CRFTimeoutError(LabelwiseError):
    """:func:`crf_refine_batch` ran past its timeout; its worker processes were killed.

    Attributes:
        unfinished: number of images without a result.
        total: number of images in the batch.
        timeout: the timeout in seconds.
    """

    def __init__(self, unfinished: int, total: int, timeout: float) -> None:
        self.unfinished = unfinished
        self.total = total
        self.timeout = timeout
        super().__init__(
            f"dense CRF timed out: {unfinished} of {total} images unfinished after {timeout:g} s; "
            "the worker processes were killed (raise `timeout` or pass smaller batches)"
        )


@dataclass
class CRFParams:
    """Dense CRF parameters (defaults: DESIGN.md evaluation protocol).

    Attributes:
        iterations: mean-field iterations, integer >= 0 (0 returns the renormalised input).
        gaussian_sxy: spatial std (pixels) of the smoothness kernel, > 0.
        gaussian_compat: Potts weight of the smoothness kernel, >= 0.
        bilateral_sxy: spatial std (pixels) of the appearance kernel, > 0.
        bilateral_srgb: color std (0-255 intensity units) of the appearance kernel, > 0.
        bilateral_compat: Potts weight of the appearance kernel, >= 0.
    """

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    def validate(self) -> None:
        """Raise :class:`~labelwise.errors.ConfigError` naming the first invalid field."""
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 0:
            raise ConfigError(f"CRFParams.iterations: must be an integer >= 0, got {it!r}")
        for f in fields(self):
            if f.name == "iterations":
                continue
            value = getattr(self, f.name)
            positive = not f.name.endswith("compat")
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ConfigError(f"CRFParams.{f.name}: must be a number, got {value!r}")
            if not math.isfinite(value) or (value <= 0 if positive else value < 0):
                bound = "> 0" if positive else ">= 0"
                raise ConfigError(f"CRFParams.{f.name}: must be finite and {bound}, got {value!r}")


def _check_pair(image: np.ndarray, probabilities: np.ndarray, where: str = "") -> None:
    """ValueError with a clear message unless ``image``/``probabilities`` suit :func:`dense_crf`."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{where}image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}image must have dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}image must have shape [H, W, 3] (RGB, channels last), got {image.shape}")
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"{where}image must not be empty, got shape {image.shape}")
    if not image.flags.c_contiguous:
        raise ValueError(f"{where}image must be C-contiguous (use np.ascontiguousarray(image))")
    if not isinstance(probabilities, np.ndarray):
        raise ValueError(f"{where}probabilities must be a numpy array, got {type(probabilities).__name__}")
    if probabilities.dtype != np.float32:
        raise ValueError(f"{where}probabilities must have dtype float32, got {probabilities.dtype}")
    if probabilities.ndim != 3 or probabilities.shape[0] == 0:
        raise ValueError(f"{where}probabilities must have shape [K, H, W] with K >= 1, got {probabilities.shape}")
    if probabilities.shape[1:] != (height, width):
        raise ValueError(
            f"{where}probabilities spatial size {probabilities.shape[1:]} does not match the image's "
            f"{(height, width)} (probabilities must be [K, H, W] for an [H, W, 3] image)"
        )
    if not np.isfinite(probabilities).all():
        raise ValueError(f"{where}probabilities must be finite (found NaN or inf)")
    if probabilities.min() < 0:
        raise ValueError(f"{where}probabilities must be >= 0 (a softmax over K), found {probabilities.min():g}")
    sums = probabilities.sum(axis=0, dtype=np.float64)
    worst = float(np.abs(sums - 1.0).max())
    if worst > 1e-3:
        raise ValueError(
            f"{where}probabilities must sum to 1 over K (axis 0) at every pixel; off by up to {worst:g}"
        )


def dense_crf(image: np.ndarray, probabilities: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """Refine one image's class probabilities with a fully connected CRF.

    Args:
        image: uint8 ``[H, W, 3]`` RGB, C-contiguous.
        probabilities: float32 ``[K, H, W]``, non-negative and summing to 1 over ``K`` at every
            pixel (a softmax over classes or clusters), K >= 1.
        params: CRF parameters; ``None`` means :class:`CRFParams` defaults.

    Returns:
        float32 ``[K, H, W]`` refined marginals (sum to 1 over ``K``).

    Raises:
        ValueError: a bad shape, dtype, layout or probability value (the message says which).
        ConfigError: an invalid ``params`` field.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    params = CRFParams() if params is None else params
    params.validate()
    _check_pair(image, probabilities)
    num_labels, height, width = probabilities.shape
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probabilities), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=float(params.gaussian_sxy), compat=float(params.gaussian_compat))
    crf.addPairwiseBilateral(
        sxy=float(params.bilateral_sxy), srgb=float(params.bilateral_srgb), rgbim=image,
        compat=float(params.bilateral_compat),
    )
    marginals = crf.inference(int(params.iterations))
    return np.asarray(marginals, dtype=np.float32).reshape(num_labels, height, width)


def _refine_worker(image: np.ndarray, probabilities: np.ndarray, params: CRFParams,
                   sleep_seconds: float = 0.0) -> np.ndarray:
    """Worker-process entry point (top level so it pickles): optional test sleep, then :func:`dense_crf`."""
    if sleep_seconds > 0:
        time.sleep(sleep_seconds)
    return dense_crf(image, probabilities, params)


def _test_sleep_seconds() -> float:
    raw = os.environ.get(TEST_SLEEP_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise ValueError(f"{TEST_SLEEP_ENV} must be a number of seconds, got {raw!r}") from None


_preload_requested = False


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver (preloading this module) where available, else spawn; never fork."""
    global _preload_requested
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    if not _preload_requested:
        # Add this module to the server's preload list (keeping what others asked for). It only
        # takes effect if the fork server is not running yet; otherwise workers import the
        # module themselves, which is slower but equally correct.
        from multiprocessing import forkserver

        current = getattr(getattr(forkserver, "_forkserver", None), "_preload_modules", None)
        modules = list(current) if current else ["__main__"]
        if __name__ not in modules:
            modules.append(__name__)
        context.set_forkserver_preload(modules)
        _preload_requested = True
    return context


def _kill_pool(executor: ProcessPoolExecutor) -> None:
    """Cancel pending work, SIGKILL every worker process and reap it."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(_KILL_JOIN_SECONDS)


def crf_refine_batch(
    images: Sequence[np.ndarray],
    probabilities: Sequence[np.ndarray],
    params: CRFParams | None = None,
    *,
    workers: int | None = None,
    timeout: float = 120.0,
) -> list[np.ndarray]:
    """Refine many images with :func:`dense_crf` in parallel worker processes.

    Args:
        images: N uint8 ``[H_i, W_i, 3]`` C-contiguous RGB images (sizes may differ).
        probabilities: N float32 ``[K_i, H_i, W_i]`` probability maps, softmax over ``K_i``.
        params: CRF parameters; ``None`` means :class:`CRFParams` defaults.
        workers: number of worker processes; ``None`` means ``min(N, os.cpu_count())``; ``0``
            runs in the calling process with no timeout. Capped at N.
        timeout: seconds (> 0) allowed for the whole batch when ``workers > 0``; after it the
            workers are killed and :class:`CRFTimeoutError` is raised. The deadline is
            measured from the start of the call, so it includes starting the workers (the
            first call in a process also starts the fork server, which blocks until the
            server has imported this module).

    Returns:
        N float32 ``[K_i, H_i, W_i]`` refined marginals, in input order.

    Raises:
        ValueError: mismatched lengths, a bad array (message names its index), bad ``workers``
            or ``timeout``.
        ConfigError: an invalid ``params`` field.
        CRFTimeoutError: the batch did not finish within ``timeout``.
        concurrent.futures.process.BrokenProcessPool: a worker died (e.g. killed for memory).
    """
    start = time.monotonic()
    images = list(images)
    probabilities = list(probabilities)
    if len(images) != len(probabilities):
        raise ValueError(f"got {len(images)} images but {len(probabilities)} probability maps")
    params = CRFParams() if params is None else params
    params.validate()
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be None or an integer >= 0, got {workers!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    for index, (image, probs) in enumerate(zip(images, probabilities)):
        _check_pair(image, probs, where=f"item {index}: ")
    if not images:
        return []
    if workers is None:
        workers = os.cpu_count() or 1
    workers = min(workers, len(images))
    if workers == 0:
        return [dense_crf(image, probs, params) for image, probs in zip(images, probabilities)]

    sleep_seconds = _test_sleep_seconds()
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context())
    finished = False
    try:
        futures = [
            executor.submit(_refine_worker, image, probs, params, sleep_seconds)
            for image, probs in zip(images, probabilities)
        ]
        remaining = max(0.0, timeout - (time.monotonic() - start))
        done, not_done = wait(futures, timeout=remaining, return_when=FIRST_EXCEPTION)
        for future in done:
            error = future.exception()
            if error is not None:
                raise error
        if not_done:
            raise CRFTimeoutError(len(not_done), len(futures), timeout)
        results = [future.result() for future in futures]
        finished = True
        return results
    finally:
        if finished:
            executor.shutdown(wait=True)
        else:
            _kill_pool(executor)


def crf_labels(
    images: Sequence[np.ndarray],
    probabilities: Sequence[np.ndarray],
    params: CRFParams | None = None,
    *,
    workers: int | None = None,
    timeout: float = 120.0,
) -> list[np.ndarray]:
    """:func:`crf_refine_batch` followed by an argmax over classes.

    Arguments and errors as :func:`crf_refine_batch`.

    Returns:
        N int64 ``[H_i, W_i]`` label maps (index into ``K_i``), in input order.
    """
    refined = crf_refine_batch(images, probabilities, params, workers=workers, timeout=timeout)
    return [marginals.argmax(axis=0).astype(np.int64) for marginals in refined]
