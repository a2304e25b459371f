"""``train(config)``: cache the frozen backbone's features of the training views once, train the
code head with the chosen objective through the shared Trainer, fit the cluster centroids on the
training codes (no labels) and export the final model.

Label-free model selection: the exported model is the one after the last step
(``selection: "final_checkpoint"``); no labels of any split are read while training or choosing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from labelwise.config import save_config, to_dict
from labelwise.data.build import build_datasets, build_eval_dataset
from labelwise.data.images import ImageFolderDataset
from labelwise.engine.ema import ema_update
from labelwise.engine.runtime import resolve_device, seed_everything
from labelwise.engine.trainer import StepContext, StepOutput, Trainer, TrainResult, trainer_options, unwrap
from labelwise.errors import ConfigError
from labelwise.eval.kmeans import kmeans
from labelwise.features.attention import affinity_local_weights
from labelwise.features.cache import FeatureCache, extract_features
from labelwise.io.atomic import atomic_write_json
from labelwise.io.run_lock import locks_run_folder
from labelwise.losses.clustering import clustering_loss, fit_prototypes
from labelwise.losses.hidden_positives import (
    HiddenPositiveLoss,
    HiddenPositiveLossConfig,
    lambda_schedule,
    mix_neighbourhood,
)
from labelwise.losses.stego import (
    StegoConfig,
    calibrated_shifts,
    knn_indices,
    sample_knn_partner,
    stego_correspondence_loss,
)
from labelwise.methods.unsupervised.config import UnsupervisedConfig
from labelwise.methods.unsupervised.data import FiveCropDataset, PhotometricCopy, ResizedDataset, TileWindows
from labelwise.methods.unsupervised.model import FEATURE_SPACE_METHODS, UnsupervisedHead, save_head
from labelwise.methods.unsupervised.primaps_fit import fit_primaps
from labelwise.models.feature_backbones import is_vit, load_feature_backbone

__all__ = ["SELECTION_RULE", "UnsupervisedResult", "CachedViews", "build_training_caches", "load_backbone", "train",
           "training_source", "training_views"]

SELECTION_RULE = "final_checkpoint"
LOCAL_KIND = "local_positive"


@dataclass
class UnsupervisedResult:
    """Outcome of :func:`train`: the run folder (also the exported model folder), the trainer's
    summary (None for k-means, which trains nothing) and the summary written to
    ``unsupervised.json``."""

    run_dir: Path
    train: TrainResult | None
    summary: dict[str, Any]


def load_backbone(spec: str) -> nn.Module:
    """The frozen backbone of ``features.backbone``: a ViT, a CNN or several joined by ``+``
    (:func:`~labelwise.models.feature_backbones.load_feature_backbone`)."""
    return load_feature_backbone(spec)


def local_weights_rule(config: UnsupervisedConfig, backbone: nn.Module) -> str | None:
    """Where HP's local positives get their neighbour weights: ``attention`` (cached with the
    features), ``affinity`` (computed from the features per batch) or None (no LHP term)."""
    if config.method != "hp" or not config.hp.local:
        return None
    rule = config.hp.local_weights
    if rule == "auto":
        return "attention" if is_vit(backbone) else "affinity"
    if rule == "attention" and not is_vit(backbone):
        raise ConfigError(f"hp.local_weights: 'attention' needs a ViT backbone, {config.features.backbone!r} has no "
                          "attention; use 'affinity' (or 'auto')")
    return rule


def training_source(config: UnsupervisedConfig) -> Dataset:
    """The training images: the ``images`` folders, else the training split of ``data`` (whole
    images; with ``features.window``, the windows of whole images or tiles)."""
    if config.images:
        source: Dataset = ImageFolderDataset(config.images, on_error=config.data.on_error)
    elif config.features.window is not None:
        source = build_datasets(config.data, seed=config.seed).train_source
    else:
        return build_datasets(config.data, seed=config.seed).train
    if config.features.window is not None:
        return TileWindows(source, config.features.window)
    return source


def training_views(config: UnsupervisedConfig, source: Dataset | None = None) -> Dataset:
    """Five crops or whole images of the training source at ``features.crop_size``."""
    source = source if source is not None else training_source(config)
    if config.features.crop_mode == "five":
        return FiveCropDataset(source, config.features.crop_size, config.features.crop_ratio)
    return ResizedDataset(source, config.features.crop_size)


def _needs_photometric_copy(config: UnsupervisedConfig) -> bool:
    return (config.method == "hp" and config.hp.consistency_weight > 0) or config.method == "picie"


def build_training_caches(config: UnsupervisedConfig, backbone: nn.Module, views: Dataset,
                          device: torch.device) -> tuple[FeatureCache, FeatureCache | None]:
    """Features (no labels) of the training views, with HP's local-positive attention weights
    when the LHP term is on, and of their photometric copies when the objective uses them."""
    local = local_weights_rule(config, backbone) == "attention"
    common = dict(batch_size=config.features.batch_size, precision=config.precision, device=device,
                  cache_dir=config.features.cache_dir, labels=False, progress=config.progress,
                  storage=config.features.storage)
    cache = extract_features(backbone, views, attention_blocks=[config.features.attention_block] if local else [],
                             attention_kinds=[LOCAL_KIND], **common)
    aug = None
    if _needs_photometric_copy(config):
        aug = extract_features(backbone, PhotometricCopy(views, seed=config.seed), **common)
    return cache, aug


class CachedViews(Dataset):
    """Items ``{"features" [D, h, w], "index"}`` (+ ``"local_weights" [9, h, w]``, ``"aug_features"``)."""

    def __init__(self, cache: FeatureCache, aug: FeatureCache | None, local_key: str | None) -> None:
        self.cache, self.aug, self.local_key = cache, aug, local_key

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"features": torch.from_numpy(np.array(self.cache.features[index], np.float32)),
                                "index": index}
        if self.local_key is not None:
            item["local_weights"] = torch.from_numpy(np.array(self.cache.attention[self.local_key][index],
                                                              np.float32))
        if self.aug is not None:
            item["aug_features"] = torch.from_numpy(np.array(self.aug.features[index], np.float32))
        return item


def cached_rows(cache: FeatureCache, indices: np.ndarray) -> Tensor:
    """Features ``[len(indices), D, h, w]`` float32 of the given samples (any order)."""
    order = np.argsort(indices)
    rows = np.asarray(cache.features[np.asarray(indices)[order]], np.float32)
    out = np.empty_like(rows)
    out[order] = rows
    return torch.from_numpy(out)


def random_patch_vectors(cache: FeatureCache, count: int, generator: torch.Generator, block: int = 512) -> Tensor:
    """``[count, D]``: one random patch of each of ``count`` random samples (without replacement
    while the cache has enough of them, as HP fills its reference pools). Each sample's row is
    read once, ``block`` samples at a time, however many of its patches are drawn."""
    n, d, h, w = cache.features.shape
    images = torch.randperm(n, generator=generator)[:count] if count <= n else torch.randint(0, n, (count,),
                                                                                           generator=generator)
    patches = torch.randint(0, h * w, (count,), generator=generator)
    unique, inverse = np.unique(images.numpy(), return_inverse=True)
    out = torch.empty(count, d)
    for first in range(0, len(unique), block):
        rows = cached_rows(cache, unique[first:first + block]).flatten(2)  # [b, D, h*w]
        wanted = np.flatnonzero((inverse >= first) & (inverse < first + block))
        out[torch.from_numpy(wanted)] = rows[torch.from_numpy(inverse[wanted] - first), :, patches[wanted]]
    return out


def _step_generator(seed: int, step: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, 7]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _fit_centroids(head: UnsupervisedHead, cache: FeatureCache, clusters: int, device: torch.device, seed: int,
                   max_points: int = 200_000, batch: int = 32) -> Tensor:
    """k-means (``clusters`` centroids, unit rows) on the normalised codes of the training views:
    no labels. A seeded subset of ``max_points`` patches when there are more."""
    head.eval()
    rng = np.random.default_rng(seed)
    n, _, h, w = cache.features.shape
    per_image = max(1, min(h * w, max_points // max(1, n)))
    points = []
    with torch.no_grad():
        for start in range(0, n, batch):
            features = torch.from_numpy(np.asarray(cache.features[start:start + batch], np.float32)).to(device)
            codes = F.normalize(head(features).float(), dim=1).flatten(2)  # [b, C, h*w]
            chosen = torch.from_numpy(rng.choice(h * w, size=per_image, replace=False)).to(device)
            points.append(codes[:, :, chosen].permute(0, 2, 1).reshape(-1, codes.shape[1]))
    x = torch.cat(points)
    return F.normalize(kmeans(x, clusters, restarts=3, max_iter=100, seed=seed).centroids, dim=1)


def normalized_size_entropy(assignments: Tensor, clusters: int) -> float:
    """Entropy of the cluster sizes of ``assignments [Q]`` (ids in ``[0, clusters)``) divided by
    ``log(clusters)``: 1 when every cluster is equally large, 0 when all points share one."""
    if clusters < 2:
        return 1.0
    sizes = torch.bincount(assignments.flatten(), minlength=clusters).double()
    p = sizes[sizes > 0] / sizes.sum()
    return float(-(p * p.log()).sum() / np.log(clusters))


def code_entropy(codes: Tensor, clusters: int, seed: int) -> float:
    """The collapse monitor: k-means (``clusters``, one seeded restart) on unit codes ``[Q, C]``,
    then :func:`normalized_size_entropy` of the assignment (no labels)."""
    result = kmeans(F.normalize(codes.float(), dim=1), min(clusters, codes.shape[0]), restarts=1, max_iter=50,
                    seed=seed)
    return normalized_size_entropy(result.labels, clusters)


def guarded_lambda(head: UnsupervisedHead, scheduled: float, entropy: float | None, guard: float | None) -> float:
    """Lambda after the collapse guard (``hp.collapse_guard``). ``head.collapse_state`` holds
    ``[reference entropy, cap]``; ``entropy`` is the monitor's value at a pool renewal (None
    between renewals). While ``scheduled`` is 0 (warm-up) the reference follows the monitor; once
    lambda rises, the first renewal whose entropy is below ``guard`` times the reference sets the
    cap to the scheduled value, which then holds for the rest of the run."""
    state = head.collapse_state
    if entropy is not None:
        if scheduled == 0.0 or bool(torch.isnan(state[0])):
            state[0] = entropy
        elif guard is not None and float(state[1]) > 1.0 and entropy < guard * float(state[0]):
            state[1] = scheduled
    return min(scheduled, float(state[1]))


def _hp_step_fn(config: UnsupervisedConfig, cache: FeatureCache, total_steps: int, clusters: int
                ) -> Callable[..., StepOutput]:
    settings = config.hp
    loss_fn = HiddenPositiveLoss(HiddenPositiveLossConfig(temperature=settings.temperature, rho=settings.rho,
                                                          precision=settings.precision,
                                                          specific_positives=settings.specific_positives))

    def step(model: nn.Module, batch: dict[str, Any], context: StepContext) -> StepOutput:
        head: UnsupervisedHead = unwrap(model)  # type: ignore[assignment]
        generator = _step_generator(config.seed, context.step)
        entropy = None
        if context.step % settings.renew_every == 0:  # task-specific pool from the momentum head
            with torch.no_grad(), torch.autocast(context.device.type, enabled=False):
                vectors = random_patch_vectors(cache, settings.pool_size, generator).to(context.device)
                head.momentum_head.eval()
                pool = head.momentum_head(vectors[:, :, None, None])[:, :, 0, 0]
                head.momentum_head.train()
                head.pool_sp.copy_(F.normalize(pool.float(), dim=1))
                if settings.task_specific:
                    entropy = code_entropy(head.pool_sp, clusters, config.seed + context.step)
        features = batch["features"]
        lam = 0.0
        if settings.task_specific:
            scheduled = min(settings.lambda_max,
                            lambda_schedule(context.step, total_steps, settings.lambda_warmup_steps))
            lam = guarded_lambda(head, scheduled, entropy, settings.collapse_guard)
        local_weights = None
        if settings.local:
            local_weights = batch["local_weights"] if "local_weights" in batch else affinity_local_weights(features)

        def compute(head: UnsupervisedHead) -> tuple[Tensor, dict[str, float]]:
            code = head.head(features)
            z = head.projection(code)
            with torch.no_grad():
                momentum = head.momentum_head(features)
            z_mix = head.projection(mix_neighbourhood(code, local_weights)) if local_weights is not None else None
            loss = loss_fn(z, features, momentum, head.pool_ag, head.pool_sp, lam, z_mix=z_mix, generator=generator)
            logs = {"hp": float(loss.detach()), "lambda": lam, **loss_fn.last_stats}
            if entropy is not None:
                logs["code_entropy"] = entropy
            if settings.consistency_weight > 0:
                z_aug = head.projection(head.head(batch["aug_features"]))
                consistency = (z.float() - z_aug.float()).norm(dim=1).mean()
                loss = loss + settings.consistency_weight * consistency
                logs["consistency"] = float(consistency.detach())
            return loss, logs

        loss, logs = model(features, compute=compute)
        return StepOutput(loss, logs, features.shape[0])

    return step


def stego_shifts(config: UnsupervisedConfig, cache: FeatureCache, knn: Tensor) -> dict[str, float]:
    """The three STEGO shifts training uses: as configured (``stego.shifts: fixed``) or
    calibrated on a seeded sample of training views and their kNN partners (no labels)."""
    settings = config.stego
    if settings.shifts == "fixed":
        return {name: getattr(settings, name) for name in SHIFT_NAMES}
    generator = torch.Generator().manual_seed(config.seed + 11)
    count = min(settings.calibration_images, len(cache))
    images = torch.randperm(len(cache), generator=generator)[:count]
    partners = sample_knn_partner(knn, images, generator)
    q_self, q_knn, q_random = settings.calibration_quantiles
    if q_random is None:
        q_random = 1.0 - 1.0 / _num_clusters(config)
    loss_config = StegoConfig(**{f.name: getattr(settings, f.name) for f in fields(StegoConfig)})
    shifts = calibrated_shifts(cached_rows(cache, images.numpy()), cached_rows(cache, partners.numpy()),
                               (q_self, q_knn, q_random), loss_config, generator)
    return {name: round(value, 6) for name, value in zip(SHIFT_NAMES, shifts)}


SHIFT_NAMES = ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift")


def _stego_step_fn(config: UnsupervisedConfig, cache: FeatureCache) -> Callable[..., StepOutput]:
    settings = config.stego
    pooled = []
    for start in range(0, len(cache), 256):
        rows = torch.from_numpy(np.asarray(cache.features[start:start + 256], np.float32))
        pooled.append(F.normalize(rows, dim=1).mean((2, 3)))
    knn = knn_indices(torch.cat(pooled), min(settings.knn, len(cache) - 1))
    shifts = stego_shifts(config, cache, knn)
    loss_config = StegoConfig(**{**{f.name: getattr(settings, f.name) for f in fields(StegoConfig)}, **shifts})
    atomic_write_json(Path(config.run_dir) / "stego_shifts.json", {"rule": settings.shifts, **shifts})

    def step(model: nn.Module, batch: dict[str, Any], context: StepContext) -> StepOutput:
        generator = _step_generator(config.seed, context.step)
        partners = sample_knn_partner(knn, batch["index"].cpu(), generator)
        features_knn = cached_rows(cache, partners.numpy()).to(context.device)
        features = batch["features"]
        loss, logs = model(features, compute=lambda head: stego_correspondence_loss(
            features, features_knn, head(features), head(features_knn), loss_config, generator))
        return StepOutput(loss, logs, features.shape[0])

    return step


def _picie_step_fn(config: UnsupervisedConfig, cache: FeatureCache, clusters: int) -> Callable[..., StepOutput]:
    settings = config.clustering
    every = settings.recluster_every or max(1, len(cache) // config.batch_size)

    def step(model: nn.Module, batch: dict[str, Any], context: StepContext) -> StepOutput:
        head: UnsupervisedHead = unwrap(model)  # type: ignore[assignment]
        if context.step % every == 0:  # re-cluster: prototypes from the current head, no gradient
            generator = _step_generator(config.seed, context.step)
            count = min(settings.fit_points, len(cache) * cache.grid[0] * cache.grid[1])
            vectors = random_patch_vectors(cache, count, generator).to(context.device)
            with torch.no_grad(), torch.autocast(context.device.type, enabled=False):
                head.eval()
                codes = head(vectors[:, :, None, None])[:, :, 0, 0]
                head.train()
            head.prototypes.copy_(fit_prototypes(codes, clusters, seed=config.seed + context.step, iters=30))
        features = batch["features"]
        loss = model(features, compute=lambda head: clustering_loss(head(features), head(batch["aug_features"]),
                                                                    head.prototypes, settings.temperature))
        return StepOutput(loss, {"clustering": float(loss.detach())}, features.shape[0])

    return step


def _num_clusters(config: UnsupervisedConfig) -> int:
    """K: ``eval.clusters``, else the number of classes of ``data`` (not available for ``images``)."""
    if config.eval.clusters is not None:
        return config.eval.clusters
    if config.images:
        raise ConfigError("eval.clusters: give the number of clusters K (--clusters K) when training on --images")
    return int(build_eval_dataset(config.data)[1].num_classes)


@locks_run_folder
def train(config: UnsupervisedConfig, resume: bool = False, overwrite: bool = False, stop_at: int | None = None
          ) -> UnsupervisedResult:
    """Train the head of ``config.method`` on cached features of the training views and export
    it (with centroids) into ``run_dir``; see the module docstring."""
    config.validate()
    # Under torchrun every rank builds (or opens) the caches and trains on its share of each
    # batch; the losses (HP's positives included) are computed per rank, the gradients averaged.
    main = int(os.environ.get("RANK", "0")) == 0
    seed_everything(config.seed)
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        save_config(config, run_dir / "config.yaml")
    clusters = _num_clusters(config)
    start = time.perf_counter()
    backbone = load_backbone(config.features.backbone)
    views = training_views(config)
    cache, aug = build_training_caches(config, backbone, views, device)
    cache_seconds = time.perf_counter() - start
    dim = {"hp": config.hp.dim, "stego": config.stego.dim, "picie": config.clustering.dim}.get(config.method, 0)
    dropout = {"hp": config.hp.dropout, "stego": config.stego.dropout, "picie": config.clustering.dropout}.get(
        config.method, 0.0)
    prototypes = config.clustering.clusters or clusters
    torch.manual_seed(config.seed)  # the head's initialisation must not depend on whether the caches existed
    head = UnsupervisedHead(config.method, cache.dim, dim, dropout, config.hp.pool_size, prototypes)
    result: TrainResult | None = None
    if config.method not in FEATURE_SPACE_METHODS:
        if config.method == "hp":
            with torch.no_grad():
                pool = random_patch_vectors(cache, config.hp.pool_size, torch.Generator().manual_seed(config.seed))
                head.pool_ag.copy_(F.normalize(pool, dim=1))
            step_fn = _hp_step_fn(config, cache, config.total_steps, clusters)
        elif config.method == "stego":
            step_fn = _stego_step_fn(config, cache)
        else:
            step_fn = _picie_step_fn(config, cache, prototypes)
        local_key = None
        if local_weights_rule(config, backbone) == "attention":
            local_key = next(k for k in cache.attention if k.startswith(LOCAL_KIND + "@"))
        dataset = CachedViews(cache, aug, local_key)
        options = trainer_options(config, config, device, batch_size=config.batch_size, batch_size_key="batch_size")
        def momentum_update(model: nn.Module, step: int) -> None:  # noqa: ARG001
            bare: UnsupervisedHead = unwrap(model)  # type: ignore[assignment]
            ema_update(bare.momentum_head, bare.head, config.hp.momentum)

        trainer = Trainer(head, dataset, step_fn, options, collate_fn=default_collate,
                          after_optimizer_step=momentum_update if config.method == "hp" else None)
        result = trainer.fit(resume=resume, overwrite=overwrite, stop_at=stop_at)
        head = trainer.bare_model  # type: ignore[assignment]
        if result.steps < config.total_steps:
            return UnsupervisedResult(run_dir, result, {})
    if not main:  # rank 0 alone fits the centroids and exports
        return UnsupervisedResult(run_dir, result, {})
    center: Tensor | None = None
    fitted: dict[str, Any] = {}
    if config.method == "primaps":
        fit = fit_primaps(cache, config.primaps, clusters, device, config.seed)
        centroids, center, fitted = fit.prototypes, fit.center, {"primaps": fit.summary}
    else:
        fit_start = time.perf_counter()
        centroids = _fit_centroids(head, cache, clusters, device, config.seed)
        fitted = {"centroid_seconds": round(time.perf_counter() - fit_start, 2)}
    summary = {
        "backbone": config.features.backbone,
        "crop_mode": config.features.crop_mode,
        "crop_size": config.features.crop_size,
        "eval_size": list(config.features.eval_size) if config.features.eval_size else None,
        "selection": SELECTION_RULE,
        "steps": config.total_steps if config.method not in FEATURE_SPACE_METHODS else 0,
        "train_views": len(cache),
        "cache_seconds": round(cache_seconds, 2),
        # what extracting the training features cost when they were first cached (this run may
        # have found them cached): the honest feature cost of the row
        "feature_extract_seconds": round(sum(float(c.manifest.get("extract_seconds", 0.0))
                                             for c in (cache, aug) if c is not None), 2),
        "train_seconds": round(result.train_seconds, 2) if result else fitted.get("primaps", {}).get("seconds", 0.0),
        "variant": _variant(config),
        **fitted,
    }
    shifts_file = run_dir / "stego_shifts.json"
    if config.method == "stego" and shifts_file.exists():
        summary["stego_shifts"] = json.loads(shifts_file.read_text())
    save_head(run_dir, backbone.cpu(), head.cpu(), centroids, summary, data=to_dict(config.data), feature_center=center)
    atomic_write_json(run_dir / "train_summary.json", summary)
    return UnsupervisedResult(run_dir, result, summary)


def _variant(config: UnsupervisedConfig) -> str:
    """The result-row method name: ``hp_ag``, ``hp_ag_sp``, ``hp_full`` (HP ablations, the
    task-specific ones with ``_agreeing`` under that rule) or the method."""
    if config.method != "hp":
        return config.method
    if not config.hp.task_specific:
        return "hp_ag" if not config.hp.local else "hp_ag_lhp"
    name = "hp_full" if config.hp.local else "hp_ag_sp"
    return name + "_agreeing" if config.hp.specific_positives == "agreeing" else name
