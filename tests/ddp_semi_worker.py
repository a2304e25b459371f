"""Run by test_ddp.py under torchrun: a few UniMatch steps (EMA teacher, feature perturbation,
strong views) through DistributedDataParallel; saves this rank's weights."""

import os
import sys
from functools import partial
from pathlib import Path

from safetensors.torch import save_file

from labelwise.config import load_config
from labelwise.data.build import build_datasets
from labelwise.data.identity import dataset_names
from labelwise.data.splits import split_labeled, write_split
from labelwise.engine.runtime import resolve_device, seed_everything
from labelwise.engine.segmenter import make_augmenters, trainer_options
from labelwise.engine.trainer import Trainer
from labelwise.losses import build_loss
from labelwise.methods.semi import SemiConfig
from labelwise.methods.semi.data import LabeledUnlabeledPairs, pair_collate, unlabeled_images
from labelwise.methods.semi.model import SemiModel
from labelwise.methods.semi.steps import make_consistency_step
from labelwise.models import create

out = Path(sys.argv[1])
data = ["data.dataset=synthetic", "data.synthetic_train_images=16", "data.synthetic_size=[32, 48]"]
names = dataset_names(build_datasets(load_config(SemiConfig, None, [*data, "semi.method=supervised_only"]).data).train)
split_dir = out / f"split{os.environ.get('RANK', '0')}"
labeled, unlabeled = write_split(split_dir, split_labeled(names, count=4, seed=0))
config = load_config(SemiConfig, None, [
    *data, f"data.train_list={labeled}", f"semi.unlabeled_list={unlabeled}", "semi.method=unimatch",
    "semi.ema_teacher=true", "semi.threshold=0.3", "data.batch_size=2", "stages.0.steps=4",
    "model.options={width: 8, depth: 2}", f"run_dir={out / 'run'}", "device=cpu", "precision=fp32",
    "progress=false", "checkpoint_every=2"])
seed_everything(config.seed + int(os.environ.get("RANK", 0)))  # ranks start different: DDP must sync them
splits = build_datasets(config.data, seed=config.seed)
pairs = LabeledUnlabeledPairs(splits.train, unlabeled_images(config, dataset_names(splits.train_source)), seed=0)
model = SemiModel(create("unet", num_classes=splits.class_map.num_classes, width=8, depth=2), ema_teacher=True)
loss = build_loss([{"name": "ce", "weight": 1.0}], num_classes=splits.class_map.num_classes)
step = make_consistency_step(config.semi, loss, make_augmenters(config.stages, 255), 255, config.seed)
trainer = Trainer(model, pairs, step, trainer_options(config, Path(config.run_dir), resolve_device("cpu"), model),
                  collate_fn=partial(pair_collate, ignore_index=255),
                  after_optimizer_step=lambda bare, step: bare.update_teacher(0.99))
result = trainer.fit(overwrite=True)
state = {k: v.contiguous() for k, v in trainer.bare_model.state_dict().items()}
save_file(state, str(out / f"rank{trainer.dist.rank}.safetensors"))
print(f"rank {trainer.dist.rank} of {trainer.dist.world_size} done: {result.steps} steps")
