"""Run by test_ddp.py under torchrun: a few steps of the HP head (momentum head, pools,
consistency term) on cached features through DistributedDataParallel; saves this rank's head."""

import os
import sys
from pathlib import Path

import torch
from ddp_common import save_weights_after_fit

from labelwise.config import load_config
from labelwise.methods import unsupervised
from labelwise.models import create_vit
from labelwise.models.vit_loading import save_vit

out = Path(sys.argv[1])
rank = int(os.environ.get("RANK", 0))
torch.manual_seed(0)
vit = save_vit(create_vit("custom", 8, embed_dim=48, depth=2, num_heads=3), out / f"vit{rank}.safetensors")
save_weights_after_fit(out)
config = load_config(unsupervised.UnsupervisedConfig, None, [
    "data.dataset=synthetic", "data.synthetic_train_images=8", "data.synthetic_val_images=4",
    "data.synthetic_size=[48, 64]", f"features.backbone={vit}", "features.crop_size=32", "features.eval_size=[48, 64]",
    f"features.cache_dir={out / 'cache'}", "method=hp", "stages.0.steps=4", "batch_size=4", "hp.pool_size=64",
    "hp.renew_every=2", "device=cpu", "precision=fp32", "progress=false", "eval.clusters=4",
    f"run_dir={out / 'run'}", "checkpoint_every=2"])
torch.manual_seed(rank)  # the head is initialised from config.seed inside train: ranks must still agree
result = unsupervised.train(config)
print(f"rank {rank} done: {result.train.steps} steps")
