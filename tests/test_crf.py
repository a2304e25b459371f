"""Dense CRF post-processing (labelwise.eval.crf), checked against direct pydensecrf calls."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

dcrf = pytest.importorskip("pydensecrf.densecrf")

from labelwise.errors import ConfigError, LabelwiseError  # noqa: E402
from labelwise.eval.crf import CRFParams, CRFTimeoutError, crf_labels, crf_refine_batch, dense_crf  # noqa: E402

H, W = 24, 32


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def _random_pair(seed: int, height: int = H, width: int = W, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    probs = _softmax(rng.normal(scale=2.0, size=(k, height, width)))
    return image, probs


def _direct_pydensecrf(image: np.ndarray, probs: np.ndarray, iterations: int, g_sxy: float, g_compat: float,
                       b_sxy: float, b_srgb: float, b_compat: float) -> np.ndarray:
    """The textbook pydensecrf recipe, written out independently of labelwise."""
    k, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, k)
    unary = -np.log(np.clip(probs, 1e-5, 1.0)).reshape(k, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=g_sxy, compat=g_compat)
    crf.addPairwiseBilateral(sxy=b_sxy, srgb=b_srgb, rgbim=np.ascontiguousarray(image), compat=b_compat)
    return np.array(crf.inference(iterations), dtype=np.float32).reshape(k, height, width)


def test_defaults_are_the_design_protocol():
    p = CRFParams()
    assert (p.iterations, p.gaussian_sxy, p.gaussian_compat) == (10, 1, 3)
    assert (p.bilateral_sxy, p.bilateral_srgb, p.bilateral_compat) == (67, 3, 4)
    p.validate()


@pytest.mark.parametrize("params", [None, CRFParams(iterations=5, gaussian_sxy=2.5, gaussian_compat=1.5,
                                                    bilateral_sxy=20, bilateral_srgb=13, bilateral_compat=6)])
def test_dense_crf_matches_direct_pydensecrf(params):
    image, probs = _random_pair(0)
    out = dense_crf(image, probs, params)
    p = CRFParams() if params is None else params
    expected = _direct_pydensecrf(image, probs, p.iterations, p.gaussian_sxy, p.gaussian_compat,
                                  p.bilateral_sxy, p.bilateral_srgb, p.bilateral_compat)
    assert out.dtype == np.float32 and out.shape == probs.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)
    assert not np.allclose(out, probs, atol=1e-3)  # it did something


def test_zero_iterations_returns_normalised_input():
    image, probs = _random_pair(1, k=3)
    probs[:, :4, :4] = 0.0
    probs[1, :4, :4] = 1.0  # exact zeros: clipped to 1e-5 by the softmax unary
    out = dense_crf(image, probs, CRFParams(iterations=0))
    clipped = np.clip(probs.astype(np.float64), 1e-5, 1.0)
    np.testing.assert_allclose(out, clipped / clipped.sum(axis=0, keepdims=True), rtol=0, atol=1e-5)


def test_crf_fixes_label_noise_on_two_flat_halves():
    rng = np.random.default_rng(2)
    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[:, : W // 2] = (200, 40, 30)
    image[:, W // 2:] = (30, 60, 190)
    truth = np.zeros((H, W), dtype=np.int64)
    truth[:, W // 2:] = 1
    flip = rng.random((H, W)) < 0.2
    noisy = np.where(flip, 1 - truth, truth)
    probs = np.where(np.arange(2)[:, None, None] == noisy[None], 0.7, 0.3).astype(np.float32)

    noisy_acc = float((probs.argmax(axis=0) == truth).mean())
    refined = dense_crf(image, probs)
    crf_acc = float((refined.argmax(axis=0) == truth).mean())
    assert 0.7 < noisy_acc < 0.9
    assert crf_acc > noisy_acc and crf_acc > 0.95


def test_batch_in_workers_equals_in_process_and_keeps_order():
    pairs = [_random_pair(10, 24, 32, 2), _random_pair(11, 16, 20, 3), _random_pair(12, 20, 28, 5)]
    images = [p[0] for p in pairs]
    probs = [p[1] for p in pairs]
    params = CRFParams(iterations=4)
    serial = crf_refine_batch(images, probs, params, workers=0)
    parallel = crf_refine_batch(images, probs, params, workers=2, timeout=300)
    assert len(parallel) == 3
    for image, prob, s, p in zip(images, probs, serial, parallel):
        assert p.shape == prob.shape and p.dtype == np.float32
        np.testing.assert_allclose(p, s, rtol=0, atol=1e-6)
        direct = _direct_pydensecrf(image, prob, 4, 1, 3, 67, 3, 4)
        np.testing.assert_allclose(p, direct, rtol=0, atol=1e-6)
    labels = crf_labels(images, probs, params, workers=0)
    for lab, s in zip(labels, serial):
        assert lab.dtype == np.int64
        np.testing.assert_array_equal(lab, s.argmax(axis=0))
    assert crf_refine_batch([], [], workers=2) == []


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in found]
        found.update(children)
        frontier.extend(children)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find worker processes")
def test_timeout_kills_workers_and_raises(monkeypatch):
    image, probs = _random_pair(3, 8, 8, 2)
    crf_refine_batch([image], [probs], workers=1, timeout=300)  # warm up the pool machinery
    baseline = _descendants(os.getpid())

    seen: set[int] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.update(_descendants(os.getpid()) - baseline)
            time.sleep(0.05)

    monkeypatch.setenv("LABELWISE_CRF_TEST_SLEEP", "30")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    try:
        with pytest.raises(CRFTimeoutError) as info:
            crf_refine_batch([image, image, image], [probs, probs, probs], workers=2, timeout=2)
    finally:
        elapsed = time.monotonic() - start
        stop.set()
        sampler.join()
    assert elapsed < 20
    assert isinstance(info.value, LabelwiseError)
    assert info.value.unfinished == 3 and info.value.total == 3
    assert "3 of 3" in str(info.value) and "2 s" in str(info.value)
    assert len(seen) >= 2, f"expected to see the 2 worker processes, saw {seen}"
    assert not [pid for pid in seen if _alive(pid)]
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("mutate, message", [
    (lambda img, p: (img.astype(np.float32), p), "uint8"),
    (lambda img, p: (img[..., 0].copy(), p), "[H, W, 3]"),
    (lambda img, p: (img[:, ::-1], p), "C-contiguous"),
    (lambda img, p: (img, p.astype(np.float64)), "float32"),
    (lambda img, p: (img, p[0]), "[K, H, W]"),
    (lambda img, p: (img, np.ascontiguousarray(p[:, :-1])), "does not match"),
    (lambda img, p: (img, p * 2), "sum to 1"),
    (lambda img, p: (img, np.where(np.isfinite(p), np.nan, p).astype(np.float32)), "finite"),
    (lambda img, p: (img, (p - 0.5).astype(np.float32)), ">= 0"),
])
def test_bad_inputs_raise_value_error(mutate, message):
    image, probs = _random_pair(4, k=2)
    bad_image, bad_probs = mutate(image, probs)
    with pytest.raises(ValueError) as info:
        dense_crf(bad_image, bad_probs)
    assert message in str(info.value)
    with pytest.raises(ValueError) as info:
        crf_refine_batch([image, bad_image], [probs, bad_probs], workers=2)
    assert "item 1:" in str(info.value) and message in str(info.value)


def test_bad_batch_arguments_raise_value_error():
    image, probs = _random_pair(5, k=2)
    with pytest.raises(ValueError, match="2 images but 1"):
        crf_refine_batch([image, image], [probs])
    with pytest.raises(ValueError, match="workers"):
        crf_refine_batch([image], [probs], workers=-1)
    with pytest.raises(ValueError, match="timeout"):
        crf_refine_batch([image], [probs], timeout=0)


@pytest.mark.parametrize("field, value", [
    ("iterations", -1), ("iterations", 2.5), ("gaussian_sxy", 0.0), ("gaussian_compat", -1.0),
    ("bilateral_sxy", -3.0), ("bilateral_srgb", float("nan")), ("bilateral_compat", float("inf")),
    ("bilateral_srgb", "3"),
])
def test_bad_params_raise_config_error_naming_the_field(field, value):
    params = CRFParams(**{field: value})
    with pytest.raises(ConfigError, match=field):
        params.validate()
    image, probs = _random_pair(6, k=2)
    with pytest.raises(ConfigError, match=field):
        dense_crf(image, probs, params)
    with pytest.raises(ConfigError, match=field):
        crf_refine_batch([image], [probs], params, workers=2)
