"""Run by test_ddp.py under torchrun: trains a tiny model and saves this rank's weights."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from labelwise.config import DataConfig, ModelConfig, StageConfig, TrainConfig
from labelwise.data import pad_collate
from labelwise.data.build import build_datasets
from labelwise.engine.runtime import resolve_device, seed_everything
from labelwise.engine.segmenter import make_augmenters, make_step_fn
from labelwise.engine.trainer import Trainer, TrainerOptions
from labelwise.losses import build_loss
from labelwise.models import create

out = Path(sys.argv[1])
config = TrainConfig(
    data=DataConfig(dataset="synthetic", batch_size=2, synthetic_train_images=16, synthetic_size=(32, 32),
                    synthetic_classes=4),
    model=ModelConfig("unet", {"width": 8, "depth": 2}),
    stages=[StageConfig(steps=6, lr=1e-2)],
    run_dir=str(out / "run"), device="cpu", precision="fp32", progress=False, checkpoint_every=3,
)
import os

seed_everything(config.seed + int(os.environ.get("RANK", 0)))  # ranks start different: DDP must sync them
splits = build_datasets(config.data)
model = create("unet", num_classes=4, width=8, depth=2)
loss = build_loss([{"name": "ce", "weight": 1.0}], num_classes=4)
options = TrainerOptions(stages=config.stages, optim=config.optim, run_dir=Path(config.run_dir),
                         device=resolve_device("cpu"), precision="fp32", batch_size=2, checkpoint_every=3,
                         progress=False)
trainer = Trainer(model, splits.train, make_step_fn(loss, make_augmenters(config.stages, 255)), options, pad_collate)
result = trainer.fit(overwrite=True)
state = {k: v.contiguous() for k, v in trainer.bare_model.state_dict().items()}
save_file(state, str(out / f"rank{trainer.dist.rank}.safetensors"))
print(f"rank {trainer.dist.rank} of {trainer.dist.world_size} done: {result.steps} steps")
