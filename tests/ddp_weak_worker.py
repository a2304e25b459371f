"""Run by test_ddp.py under torchrun: the weak-supervision classifier (multi-class-token ViT)
trained for a few steps through `weak.train_classifier`; saves this rank's final weights."""

import os
import sys
from pathlib import Path

import torch
from ddp_common import save_weights_after_fit

from labelwise.config import load_config
from labelwise.methods.weak import WeakConfig, train_classifier
from labelwise.models.vit import create_vit
from labelwise.models.vit_loading import save_vit

out = Path(sys.argv[1])
rank = int(os.environ.get("RANK", 0))
torch.manual_seed(0)
backbone = save_vit(create_vit("custom", 8, embed_dim=32, depth=2, num_heads=2), out / f"vit{rank}.safetensors")
save_weights_after_fit(out)
torch.manual_seed(rank)  # ranks draw different new parameters: DDP must sync them
config = load_config(WeakConfig, None, [
    "data.dataset=synthetic", "data.synthetic_train_images=16", "data.synthetic_size=[32, 48]",
    f"backbone={backbone}", "image_size=[32, 48]", "stages.0.steps=4", "batch_size=4", "stages.0.lr=0.002", "seed=0",
    f"run_dir={out / 'run'}", "device=cpu", "progress=false", "checkpoint_every=2", "precision=fp32", "cams.blocks=2"])
result = train_classifier(config)
print(f"rank {rank} done: {result.train.steps} steps")
