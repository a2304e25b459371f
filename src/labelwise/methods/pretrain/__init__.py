"""Self-supervised pretraining of a backbone on unlabeled images (``labelwise pretrain``).

Methods (``PretrainConfig.method``): ``dino`` (self-distillation with an EMA teacher and
multi-crop; ``dino.ibot: true`` adds iBOT's masked-patch term), ``moco`` (MoCo v2 InfoNCE with a
momentum encoder and a queue), ``dense_moco`` (plus a dense, per-location term; DenseCL-style)
and ``rotation`` (predict 0/90/180/270 degree rotations). Backbones: a ViT (any size, patch,
registers) or the U-Net encoder.

    from labelwise.config import load_config
    from labelwise.methods import pretrain
    from labelwise.models.vit_loading import load_vit

    config = load_config(pretrain.PretrainConfig, "configs/pretrain_dino_vit_tiny.yaml", ["stages.0.steps=200"])
    result = pretrain.train(config)            # run_dir/weights.safetensors + model.json
    vit = load_vit(result.backbone_path)       # the pretrained ViT (the EMA teacher)

Modules: ``config`` (the dataclasses), ``backbone`` (ViT / U-Net adapters, export),
``objective`` (base class, EMA update, schedules), ``dino``, ``moco``, ``rotation`` (one per
objective), ``run`` (``train``: the run itself).
"""

from labelwise.engine.ema import ema_update
from labelwise.engine.schedule import cosine_schedule
from labelwise.methods.pretrain.config import (
    METHODS,
    BackboneConfig,
    DINOConfig,
    MoCoConfig,
    PretrainConfig,
    PretrainDataConfig,
    RotationConfig,
)
from labelwise.methods.pretrain.objective import Objective
from labelwise.methods.pretrain.run import BACKBONE_FILE, SUMMARY_FILE, PretrainResult, build_objective, train

__all__ = [
    "BACKBONE_FILE",
    "METHODS",
    "SUMMARY_FILE",
    "BackboneConfig",
    "DINOConfig",
    "MoCoConfig",
    "Objective",
    "PretrainConfig",
    "PretrainDataConfig",
    "PretrainResult",
    "RotationConfig",
    "build_objective",
    "cosine_schedule",
    "ema_update",
    "train",
]
