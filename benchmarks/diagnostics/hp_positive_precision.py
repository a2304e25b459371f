"""Diagnostic (uses training labels; not a benchmark): how often hidden positives share the anchor's class.

Run from the project root after `benchmarks/unsupervised.py --dataset camvid`:
`.venv/bin/python benchmarks/diagnostics/hp_positive_precision.py benchmarks/runs/unsupervised_camvid`.
The hidden-positive rule (similarity above min of both anchors' max similarity to a pool of 1,835
random training patches) is applied to the backbone features and to the codes of the trained HP
heads of 48 seeded training views; prints the same-class rate of the selected pairs.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from labelwise.config import load_config
from labelwise.methods import unsupervised
from labelwise.methods.unsupervised.model import load_head
from labelwise.methods.unsupervised.train import (
    build_training_caches,
    cached_rows,
    load_backbone,
    random_patch_vectors,
    training_views,
)

ROOT = Path(__file__).resolve().parents[2]
runs = sys.argv[1]
config = load_config(unsupervised.UnsupervisedConfig, ROOT / "configs" / "unsupervised_camvid.yaml",
                     [f"data.root={ROOT.parent / 'shared' / 'data' / 'camvid'}",
                      f"features.backbone={ROOT / 'src' / 'labelwise' / 'weights' / 'labelwise_vit.safetensors'}", "progress=false",
                      "method=hp", "hp.local=false"])
views = training_views(config)
cache, _ = build_training_caches(config, load_backbone(config.features.backbone), views, torch.device('cpu'))
g = torch.Generator().manual_seed(0)
idx = np.sort(torch.randperm(len(cache), generator=g)[:48].numpy())
feats = cached_rows(cache, idx)  # [48, D, 14, 14]
labels = []
for i in idx:
    m = views[int(i)]["mask"]  # [224, 224]
    onehot = F.one_hot(m.clamp(max=11).long(), 12).permute(2, 0, 1).float()[None]
    frac = F.avg_pool2d(onehot, 16)[0]  # [12, 14, 14]
    lab = frac.argmax(0); lab[frac.max(0).values < 0.5] = -1; lab[lab == 11] = -1
    labels.append(lab.flatten())
labels = torch.cat(labels)
pool_feats = random_patch_vectors(cache, 1835, torch.Generator().manual_seed(0))
valid = labels >= 0
same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
off = ~torch.eye(len(labels), dtype=torch.bool)
base = float(same[off & valid[:, None] & valid[None, :]].float().mean())
def report(name, x, pool):
    x = F.normalize(x, dim=1); pool = F.normalize(pool, dim=1)
    c = (x @ pool.T).amax(1)
    sim = x @ x.T
    pos = (sim > torch.minimum(c[:, None], c[None, :])) & off & valid[:, None] & valid[None, :]
    prec = float(same[pos].float().mean()); count = float(pos.sum(1).float().mean())
    # the same number of nearest neighbours per anchor, for comparison
    k = max(1, int(round(count)))
    simv = sim.clone(); simv[~off] = -2
    nn_idx = simv.topk(k, dim=1).indices
    nn_prec = float((labels[nn_idx] == labels[:, None])[valid].float().mean())
    out = {"name": name, "positives_per_patch": round(count, 1), "precision": round(prec, 3), "knn_precision_same_count": round(nn_prec, 3)}
    print(json.dumps(out), flush=True)
print(json.dumps({"base_rate_same_class": round(base, 3), "patches": int(valid.sum())}))
rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
report("backbone features (task-agnostic positives)", rows, pool_feats)
for run in ("hp_ag_pretrained", "hp_ag_sp_pretrained", "hp_full_pretrained"):
    head = load_head(f"{runs}/{run}")
    codes = head.codes(feats).permute(0, 2, 3, 1).reshape(-1, head.centroids.shape[1])
    pool_codes = head.codes(pool_feats[:, :, None, None])[:, :, 0, 0]
    report(f"{run} head codes (task-specific-style positives)", codes, pool_codes)
