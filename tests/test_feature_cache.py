"""Feature cache: reuse by key, equality with a direct forward, atomicity, errors, dataset view."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from labelwise.data import SyntheticShapes
from labelwise.errors import ConfigError, DataError
from labelwise.features.cache import (
    FeatureCache,
    cache_key,
    default_cache_dir,
    extract_features,
    neighbourhood_attention,
)
from labelwise.models.vit import create_vit


def tiny_vit(seed: int = 0, patch_size: int = 8):
    torch.manual_seed(seed)
    return create_vit("vit_tiny", patch_size=patch_size, embed_dim=48, depth=2, num_heads=3, num_registers=1)


class Counting(nn.Module):
    """Wraps a ViT and counts the images it sees; optionally fails at a given call."""

    def __init__(self, vit: nn.Module, fail_at: int | None = None, hard: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.patch_size = vit.patch_size
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.depth = vit.depth
        self.images = 0
        self.calls = 0
        self.fail_at = fail_at
        self.hard = hard

    def forward(self, images, return_attention=()):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            if self.hard:
                os._exit(3)  # a crash: no exception handler, no clean-up runs
            raise RuntimeError("backbone failed")
        self.images += images.shape[0]
        return self.vit(images, return_attention=return_attention)


@pytest.fixture
def data():
    return SyntheticShapes(num_images=10, size=(40, 56), num_classes=4, seed=3)


def test_second_call_opens_cache_without_running_backbone(tmp_path, data):
    backbone = Counting(tiny_vit())
    first = extract_features(backbone, data, batch_size=4, cache_dir=tmp_path, num_workers=1)
    assert first.extracted and backbone.images == len(data)
    assert first.features.shape == (10, 48, 5, 7) and first.features.dtype == np.float16
    second = extract_features(backbone, data, batch_size=3, cache_dir=tmp_path, num_workers=0)
    assert backbone.images == len(data), "the backbone ran again"
    assert not second.extracted and second.path == first.path
    np.testing.assert_array_equal(np.asarray(second.features), np.asarray(first.features))
    assert second.names == [data[i]["name"] for i in range(len(data))]
    assert [p.name for p in tmp_path.iterdir()] == [first.key]


def test_key_changes_with_weights_preprocessing_precision_and_dataset(tmp_path, data):
    vit = tiny_vit()
    base, _ = cache_key(vit, data, {})
    assert cache_key(vit, data, {})[0] == base
    assert cache_key(vit, data, {"resize": [32, 48]})[0] != base
    assert cache_key(vit, data, {}, precision="fp32")[0] != base
    assert cache_key(vit, data, {}, attention_blocks=(-1,))[0] != base
    other_seed = SyntheticShapes(num_images=10, size=(40, 56), num_classes=4, seed=4)  # same names, other images
    assert cache_key(vit, other_seed, {})[0] != base
    with torch.no_grad():
        vit.blocks[1].mlp.fc2.bias[0] += 1e-3
    assert cache_key(vit, data, {})[0] != base

    backbone = Counting(vit)
    extract_features(backbone, data, cache_dir=tmp_path, num_workers=0)
    extract_features(backbone, data, cache_dir=tmp_path, num_workers=0, preprocessing={"resize": 32})
    assert backbone.images == 2 * len(data)
    with torch.no_grad():
        vit.cls_token.add_(0.1)
    changed = extract_features(backbone, data, cache_dir=tmp_path, num_workers=0)
    assert changed.extracted and backbone.images == 3 * len(data)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_features_and_attention_equal_direct_forward(tmp_path, data, precision):
    vit = tiny_vit().eval()
    cache = extract_features(vit, data, batch_size=4, precision=precision, cache_dir=tmp_path, num_workers=1,
                             attention_blocks=(-1, 0), attention_kinds=("cls", "patch", "neighbourhood"))
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        reference = vit(images, return_attention=(0, 1))
    features = torch.from_numpy(np.asarray(cache.features, dtype=np.float32))
    tolerance = 2e-3 if precision == "fp32" else 6e-2  # fp16 storage; bf16 compute
    scale = reference.patch_tokens.abs().max()
    assert (features - reference.patch_tokens).abs().max() <= tolerance * scale
    if precision == "bf16":  # really computed in bf16: not bit-equal to fp32
        assert (features - reference.patch_tokens).abs().max() > 1e-4
    prefix = vit.num_prefix_tokens
    for block in (0, 1):
        attn = reference.attentions[block].numpy()  # [B, heads, N, N]
        cls = attn[:, :, 0, prefix:].reshape(10, 3, 5, 7)
        patch = attn[:, :, prefix:, prefix:].mean(1)
        np.testing.assert_allclose(cache.attention_map(block, "cls"), cls, atol=5e-3)
        np.testing.assert_allclose(cache.attention_map(block, "patch"), patch, atol=5e-3)
        neighbours = np.zeros((10, 9, 5, 7))
        for y in range(5):
            for x in range(7):
                for c, (dy, dx) in enumerate([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]):
                    if 0 <= y + dy < 5 and 0 <= x + dx < 7:
                        neighbours[:, c, y, x] = patch[:, y * 7 + x, (y + dy) * 7 + x + dx]
        np.testing.assert_allclose(cache.attention_map(block, "neighbourhood"), neighbours, atol=5e-3)
    assert cache.attention_map(-1, "cls").shape == (10, 3, 5, 7)


def test_labels_and_preprocessing(tmp_path, data):
    cache = extract_features(tiny_vit(), data, cache_dir=tmp_path, num_workers=0,
                             preprocessing={"resize": [20, 28], "crop": [16, 24]})
    assert cache.image_size == (16, 24) and cache.features.shape[2:] == (2, 3) and cache.stride == 8
    mask = data[2]["mask"].numpy()
    rows = np.minimum(((np.arange(20) + 0.5) * 2).astype(int), 39)
    cols = np.minimum(((np.arange(28) + 0.5) * 2).astype(int), 55)
    expected = mask[rows][:, cols][2:18, 2:26]
    np.testing.assert_array_equal(cache.labels[2], expected)
    assert cache.labels.dtype == np.uint8 and cache.num_classes == 4 and cache.ignore_index == 255
    with pytest.raises(ConfigError, match="preprocessing.flip"):
        extract_features(tiny_vit(), data, cache_dir=tmp_path, preprocessing={"flip": True})


class TwoSizes(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, index):
        size = (32, 32) if index != 3 else (24, 32)
        return {"image": torch.rand(3, *size), "name": f"img{index}"}


def test_size_mismatch_is_an_error_naming_the_sample(tmp_path):
    for workers, batch in ((0, 2), (1, 5)):
        with pytest.raises(DataError, match="img3"):
            extract_features(tiny_vit(), TwoSizes(), batch_size=batch, cache_dir=tmp_path, num_workers=workers)
        assert not any(tmp_path.iterdir())
    cache = extract_features(tiny_vit(), TwoSizes(), cache_dir=tmp_path, preprocessing={"resize": 16})
    assert cache.features.shape == (5, 48, 2, 2) and cache.labels is None


def _crash_child(cache_dir, fail_at):
    torch.set_num_threads(1)
    backbone = Counting(tiny_vit(), fail_at=fail_at, hard=True)
    extract_features(backbone, SyntheticShapes(num_images=10, size=(40, 56), num_classes=4, seed=3), batch_size=2,
                     cache_dir=cache_dir, num_workers=0)


def test_crash_mid_extraction_leaves_no_valid_looking_cache(tmp_path, data):
    key, _ = cache_key(Counting(tiny_vit()), data, {})
    # an exception: the partial folder is removed
    with pytest.raises(RuntimeError, match="backbone failed"):
        extract_features(Counting(tiny_vit(), fail_at=3), data, batch_size=2, cache_dir=tmp_path, num_workers=0)
    assert list(tmp_path.iterdir()) == []
    # a hard crash (process killed mid-way): only a partial folder remains, never <key>/
    child = multiprocessing.get_context("fork").Process(target=_crash_child, args=(tmp_path, 3))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".partial-{key}-")
    assert not (tmp_path / key).exists()
    with pytest.raises(DataError, match="manifest"):
        FeatureCache.open(leftovers[0])
    backbone = Counting(tiny_vit())
    cache = extract_features(backbone, data, batch_size=2, cache_dir=tmp_path, num_workers=0)
    assert cache.key == key and backbone.images == len(data)
    assert [p.name for p in tmp_path.iterdir()] == [key], "the stale partial folder was not cleaned up"


def test_corrupt_cache_is_rebuilt(tmp_path, data):
    first = extract_features(tiny_vit(), data, cache_dir=tmp_path, num_workers=0)
    (first.path / "features.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="features.npy"):
        FeatureCache.open(first.path)
    backbone = Counting(tiny_vit())
    again = extract_features(backbone, data, cache_dir=tmp_path, num_workers=0)
    assert again.extracted and backbone.images == len(data) and again.features.shape == (10, 48, 5, 7)


def test_dataset_view_and_default_dir(tmp_path, data, monkeypatch):
    cache = extract_features(tiny_vit(), data, cache_dir=tmp_path, num_workers=0, attention_blocks=(-1,))
    view = cache.dataset()
    item = view[4]
    assert item["features"].dtype == torch.float32 and item["features"].shape == (48, 5, 7)
    assert item["mask"].shape == (40, 56) and item["name"] == data[4]["name"]
    assert item["attention"]["cls@1"].shape == (3, 5, 7)
    batch = next(iter(DataLoader(view, batch_size=4)))
    assert batch["features"].shape == (4, 48, 5, 7) and batch["mask"].shape == (4, 40, 56)
    monkeypatch.setenv("LABELWISE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "features"
    monkeypatch.delenv("LABELWISE_CACHE")
    assert default_cache_dir() == default_cache_dir().home() / ".cache" / "labelwise" / "features"


def test_neighbourhood_attention_edges():
    attention = torch.arange(36.0).reshape(1, 6, 6)  # grid 2 x 3
    out = neighbourhood_attention(attention, (2, 3))
    assert out[0, 4].tolist() == torch.diagonal(attention[0]).reshape(2, 3).tolist()  # centre = self
    assert out[0, 0, 0, 0] == 0  # up-left of the corner is outside
    assert out[0, 8, 0, 0] == attention[0, 0, 4]  # down-right of (0, 0) is patch (1, 1) = index 4
