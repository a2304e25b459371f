"""Loading ViT backbones from foreign checkpoint layouts.

Each test builds a random model, writes a checkpoint in a foreign layout by hand (the key names
and shapes of that layout are spelled out here, not produced by the converter), loads it with
``load_vit`` and checks that the loaded model computes exactly what the source model computes.
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from labelwise.errors import CheckpointError, ConfigError
from labelwise.models import vit_loading
from labelwise.models.vit import VisionTransformer, ViTConfig
from labelwise.models.vit_loading import convert_state_dict, detect_layout, load_vit, resolve_backbone, save_vit

DIM, HEADS, DEPTH = 48, 3, 2


def tiny(patch_size: int = 8, pos_grid: int = 4, seed: int = 0, **options) -> VisionTransformer:
    torch.manual_seed(seed)
    config = ViTConfig(arch="custom", embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                       patch_size=patch_size, pos_grid=pos_grid, **options)
    model = VisionTransformer(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ls" in name or "token" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def images(height: int, width: int) -> torch.Tensor:
    return torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(7))


def assert_same_outputs(expected: VisionTransformer, loaded: VisionTransformer, sizes=((32, 32), (40, 24))) -> None:
    loaded.eval()
    for height, width in sizes:
        x = images(height, width)
        with torch.no_grad():
            a, b = expected(x, return_attention=[-1]), loaded(x, return_attention=[-1])
        assert torch.allclose(a.cls_token, b.cls_token, atol=1e-5)
        assert torch.allclose(a.patch_tokens, b.patch_tokens, atol=1e-5)
        assert torch.allclose(a.attentions[DEPTH - 1], b.attentions[DEPTH - 1], atol=1e-6)
        if a.register_tokens is not None:
            assert torch.allclose(a.register_tokens, b.register_tokens, atol=1e-5)


def t(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().contiguous()


# -- foreign layouts written by hand ------------------------------------------------------------


def dino_dict(m: VisionTransformer, prefix: str = "") -> dict[str, torch.Tensor]:
    """The official DINO / DINOv2 backbone keys."""
    sd = {
        "cls_token": t(m.cls_token),                          # [1, 1, D]
        "pos_embed": t(m.pos_embed),                          # [1, 1 + G*G, D]
        "patch_embed.proj.weight": t(m.patch_embed.proj.weight),
        "patch_embed.proj.bias": t(m.patch_embed.proj.bias),
        "norm.weight": t(m.norm.weight),
        "norm.bias": t(m.norm.bias),
    }
    if m.register_tokens is not None:
        sd["register_tokens"] = t(m.register_tokens)          # [1, R, D]
    if m.mask_token is not None:
        sd["mask_token"] = t(m.mask_token)                    # [1, D]
    for i, b in enumerate(m.blocks):
        for name, tensor in [
            ("norm1.weight", b.norm1.weight), ("norm1.bias", b.norm1.bias),
            ("attn.qkv.weight", b.attn.qkv.weight), ("attn.qkv.bias", b.attn.qkv.bias),
            ("attn.proj.weight", b.attn.proj.weight), ("attn.proj.bias", b.attn.proj.bias),
            ("norm2.weight", b.norm2.weight), ("norm2.bias", b.norm2.bias),
            ("mlp.fc1.weight", b.mlp.fc1.weight), ("mlp.fc1.bias", b.mlp.fc1.bias),
            ("mlp.fc2.weight", b.mlp.fc2.weight), ("mlp.fc2.bias", b.mlp.fc2.bias),
        ]:
            sd[f"blocks.{i}.{name}"] = t(tensor)
        if hasattr(b.ls1, "gamma"):
            sd[f"blocks.{i}.ls1.gamma"] = t(b.ls1.gamma)
            sd[f"blocks.{i}.ls2.gamma"] = t(b.ls2.gamma)
    return {prefix + k: v for k, v in sd.items()}


def hf_dict(m: VisionTransformer, dinov2: bool, prefix: str = "") -> dict[str, torch.Tensor]:
    """Hugging Face ``ViTModel`` / ``Dinov2Model`` keys (separate query/key/value)."""
    sd = {
        "embeddings.cls_token": t(m.cls_token),
        "embeddings.position_embeddings": t(m.pos_embed),
        "embeddings.patch_embeddings.projection.weight": t(m.patch_embed.proj.weight),
        "embeddings.patch_embeddings.projection.bias": t(m.patch_embed.proj.bias),
        "layernorm.weight": t(m.norm.weight),
        "layernorm.bias": t(m.norm.bias),
    }
    if m.mask_token is not None:
        sd["embeddings.mask_token"] = t(m.mask_token)
    if m.register_tokens is not None:
        sd["embeddings.register_tokens"] = t(m.register_tokens)
    for i, b in enumerate(m.blocks):
        layer = f"encoder.layer.{i}."
        w, bias = b.attn.qkv.weight, b.attn.qkv.bias
        for j, part in enumerate(("query", "key", "value")):
            sd[f"{layer}attention.attention.{part}.weight"] = t(w[j * DIM:(j + 1) * DIM])
            sd[f"{layer}attention.attention.{part}.bias"] = t(bias[j * DIM:(j + 1) * DIM])
        sd[f"{layer}attention.output.dense.weight"] = t(b.attn.proj.weight)
        sd[f"{layer}attention.output.dense.bias"] = t(b.attn.proj.bias)
        if dinov2:
            names = {"norm1": b.norm1, "norm2": b.norm2, "mlp.fc1": b.mlp.fc1, "mlp.fc2": b.mlp.fc2}
            sd[f"{layer}layer_scale1.lambda1"] = t(b.ls1.gamma)
            sd[f"{layer}layer_scale2.lambda1"] = t(b.ls2.gamma)
        else:
            names = {"layernorm_before": b.norm1, "layernorm_after": b.norm2,
                     "intermediate.dense": b.mlp.fc1, "output.dense": b.mlp.fc2}
        for name, module in names.items():
            sd[f"{layer}{name}.weight"] = t(module.weight)
            sd[f"{layer}{name}.bias"] = t(module.bias)
    return {prefix + k: v for k, v in sd.items()}


def test_dino_plain(tmp_path: Path) -> None:
    source = tiny()
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(dino_dict(source), path)
    assert detect_layout(torch.load(path, weights_only=True)) == "dino"
    loaded = load_vit(path, num_heads=HEADS)
    assert loaded.config.patch_size == 8 and loaded.config.pos_grid == 4 and loaded.depth == DEPTH
    assert loaded.config.layer_scale is None and loaded.config.num_registers == 0
    assert_same_outputs(source, loaded)


def test_dino_standard_width_infers_heads(tmp_path: Path) -> None:
    """A ViT-S-wide checkpoint needs no num_heads (384 -> 6), and arch is recognised."""
    torch.manual_seed(0)
    source = VisionTransformer(ViTConfig(arch="vit_small", depth=1, patch_size=16, pos_grid=2)).eval()
    path = tmp_path / "dino_small.pth"
    torch.save({"module." + k: v for k, v in dino_dict(source).items()}, path)  # DDP prefix
    loaded = load_vit(path)
    assert loaded.num_heads == 6 and loaded.embed_dim == 384
    x = images(32, 32)
    with torch.no_grad():
        assert torch.allclose(source(x).patch_tokens, loaded(x).patch_tokens, atol=1e-5)


def test_dino_training_checkpoint(tmp_path: Path) -> None:
    teacher, student = tiny(seed=1), tiny(seed=2)
    checkpoint = {
        "student": {**dino_dict(student, "module.backbone."),
                    "module.head.mlp.0.weight": torch.randn(64, DIM),
                    "module.head.last_layer.weight_g": torch.ones(256, 1)},
        "teacher": {**dino_dict(teacher, "backbone."),
                    "head.mlp.0.weight": torch.randn(64, DIM),
                    "head.last_layer.weight_v": torch.randn(256, 64)},
        "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1).state_dict(),
        "epoch": 12,
        "args": argparse.Namespace(arch="vit_small", patch_size=8, out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 256)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    assert_same_outputs(teacher, load_vit(path, num_heads=HEADS))
    assert_same_outputs(student, load_vit(path, num_heads=HEADS, checkpoint_key="student"))
    with pytest.raises(CheckpointError, match="'ema'"):
        load_vit(path, num_heads=HEADS, checkpoint_key="ema")


def test_dinov2_training_checkpoint_flat(tmp_path: Path) -> None:
    """DINOv2 training checkpoints: {"model": {"teacher.backbone.*", "teacher.dino_head.*", ...}}."""
    teacher = tiny(seed=3, layer_scale=1e-5, mask_token=True)
    student = tiny(seed=4, layer_scale=1e-5, mask_token=True)
    model = {**dino_dict(teacher, "teacher.backbone."), **dino_dict(student, "student.backbone."),
             "teacher.dino_head.mlp.0.weight": torch.randn(8, DIM),
             "teacher.ibot_head.mlp.0.weight": torch.randn(8, DIM)}
    path = tmp_path / "model_0012499.rank_0.pth"
    torch.save({"model": model, "iteration": 12499}, path)
    assert_same_outputs(teacher, load_vit(path, num_heads=HEADS))


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2(tmp_path: Path, registers: int) -> None:
    source = tiny(patch_size=14, pos_grid=3, layer_scale=1e-5, mask_token=True, num_registers=registers)
    sd = dino_dict(source)
    assert sd["mask_token"].shape == (1, DIM) and sd["pos_embed"].shape == (1, 1 + 9, DIM)
    path = tmp_path / ("dinov2_vits14_reg4_pretrain.pth" if registers else "dinov2_vits14_pretrain.pth")
    torch.save(sd, path)
    assert detect_layout(sd) == "dinov2"
    loaded = load_vit(path, num_heads=HEADS)
    config = loaded.config
    assert (config.patch_size, config.pos_grid, config.num_registers) == (14, 3, registers)
    assert config.layer_scale is not None and config.mask_token
    assert_same_outputs(source, loaded, sizes=((42, 42), (30, 57)))
    masks = torch.zeros(2, 9, dtype=torch.bool)
    masks[:, 4] = True
    x = images(42, 42)
    with torch.no_grad():
        assert torch.allclose(source(x, masks=masks).patch_tokens, loaded(x, masks=masks).patch_tokens, atol=1e-5)


def test_dinov2_chunked_blocks(tmp_path: Path) -> None:
    """block_chunks > 0: block i of chunk c is stored as blocks.c.i."""
    source = tiny(layer_scale=1e-5, mask_token=True)
    sd = {}
    for key, value in dino_dict(source).items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{index}.{index}.{rest}"  # depth 2, 2 chunks: chunk i holds block i
        sd[key] = value
    assert "blocks.1.1.attn.qkv.weight" in sd
    path = tmp_path / "chunked.pth"
    torch.save(sd, path)
    assert_same_outputs(source, load_vit(path, num_heads=HEADS))


def test_timm_standard_with_head(tmp_path: Path) -> None:
    source = tiny(layer_scale=0.5)
    sd = dino_dict(source)
    sd["head.weight"] = torch.randn(1000, DIM)
    sd["head.bias"] = torch.randn(1000)
    assert detect_layout(sd) == "timm"
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    assert_same_outputs(source, load_vit(path, num_heads=HEADS))


def test_timm_registers_no_embed_class(tmp_path: Path) -> None:
    """timm's DINOv2-with-registers ports: ``reg_token``; ``pos_embed`` covers patches only and
    the class token carries its own position."""
    source = tiny(patch_size=14, pos_grid=3, layer_scale=1e-5, num_registers=4)
    sd = dino_dict(source)
    sd["cls_token"] = t(source.cls_token + source.pos_embed[:, :1])
    sd["pos_embed"] = t(source.pos_embed[:, 1:])  # [1, G*G, D]
    sd["reg_token"] = sd.pop("register_tokens")
    sd["head.weight"], sd["head.bias"] = torch.randn(5, DIM), torch.randn(5)
    path = tmp_path / "timm_reg.safetensors"
    save_file(sd, str(path))
    assert detect_layout(sd) == "timm"
    assert_same_outputs(source, load_vit(path, num_heads=HEADS), sizes=((42, 42), (28, 70)))


def test_timm_registers_with_prefix_positions(tmp_path: Path) -> None:
    """timm with ``no_embed_class=False`` and registers: ``pos_embed [1, 1 + R + G*G, D]``."""
    source = tiny(num_registers=2)
    sd = dino_dict(source)
    register_pos = torch.randn(1, 2, DIM)
    sd["pos_embed"] = torch.cat([t(source.pos_embed[:, :1]), register_pos, t(source.pos_embed[:, 1:])], dim=1)
    sd["reg_token"] = sd.pop("register_tokens") - register_pos
    sd["head.weight"], sd["head.bias"] = torch.randn(5, DIM), torch.randn(5)
    path = tmp_path / "timm_reg_pos.pth"
    torch.save(sd, path)
    assert_same_outputs(source, load_vit(path, num_heads=HEADS))


def test_timm_fc_norm(tmp_path: Path) -> None:
    """Global-pool timm models: ``norm`` is an identity and ``fc_norm`` is the final LayerNorm."""
    source = tiny()
    sd = dino_dict(source)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    sd["head.weight"], sd["head.bias"] = torch.randn(7, DIM), torch.randn(7)
    path = tmp_path / "timm_gap.pth"
    torch.save(sd, path)
    assert_same_outputs(source, load_vit(path, num_heads=HEADS))


@pytest.mark.parametrize("prefix", ["", "vit."])
def test_hf_vit(tmp_path: Path, prefix: str) -> None:
    source = tiny()
    sd = hf_dict(source, dinov2=False, prefix=prefix)
    if prefix:  # ViTForImageClassification
        sd["classifier.weight"], sd["classifier.bias"] = torch.randn(10, DIM), torch.randn(10)
    else:  # ViTModel with its pooler
        sd["pooler.dense.weight"], sd["pooler.dense.bias"] = torch.randn(DIM, DIM), torch.randn(DIM)
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "num_attention_heads": HEADS,
                                                    "hidden_size": DIM, "patch_size": 8}))
    assert detect_layout(sd) == "hf_vit"
    loaded = load_vit(folder / "model.safetensors")  # heads from config.json
    assert loaded.num_heads == HEADS
    assert_same_outputs(source, loaded)
    assert_same_outputs(source, load_vit(folder))  # the folder itself


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("prefix", ["", "dinov2."])
def test_hf_dinov2(tmp_path: Path, registers: int, prefix: str) -> None:
    source = tiny(patch_size=14, pos_grid=3, layer_scale=1e-5, mask_token=True, num_registers=registers)
    sd = hf_dict(source, dinov2=True, prefix=prefix)
    if prefix:
        sd["classifier.weight"], sd["classifier.bias"] = torch.randn(10, 2 * DIM), torch.randn(10)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    assert detect_layout(sd) == "hf_dinov2"
    loaded = load_vit(path, num_heads=HEADS)
    assert loaded.config.num_registers == registers and loaded.config.mask_token
    assert_same_outputs(source, loaded, sizes=((42, 42), (31, 44)))


def test_labelwise_safetensors_round_trip(tmp_path: Path) -> None:
    source = tiny(patch_size=14, pos_grid=3, layer_scale=1e-5, mask_token=True, num_registers=2,
                  attention_kernel="sdpa")
    path = save_vit(source, tmp_path / "weights" / "labelwise_vit.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["labelwise_vit.safetensors"]  # no temp files
    loaded = load_vit(path)  # everything from the metadata, no overrides needed
    assert loaded.config == source.config
    assert_same_outputs(source, loaded, sizes=((42, 42), (20, 33)))
    assert load_vit(path, drop_path=0.2).config.drop_path == 0.2
    with pytest.raises(CheckpointError, match="safetensors"):
        save_vit(source, tmp_path / "x.pth")


def test_convert_state_dict_public_api() -> None:
    source = tiny(layer_scale=0.1, mask_token=True)
    native = convert_state_dict(hf_dict(source, dinov2=True), "hf_dinov2")
    assert set(native) == set(source.state_dict())
    assert torch.equal(native["blocks.1.attn.qkv.weight"], source.blocks[1].attn.qkv.weight.detach())
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        convert_state_dict({}, "caffe")


# -- errors ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing.pth"):
        load_vit(tmp_path / "nothing.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    sd = dino_dict(tiny())
    torch.save(sd, path) if suffix == ".pth" else save_file(sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cut{suffix}"):
        load_vit(path, num_heads=HEADS)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_garbage_bytes(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=f"garbage{suffix}.*truncated or corrupt"):
        load_vit(path)


def test_missing_key(tmp_path: Path) -> None:
    sd = dino_dict(tiny())
    del sd["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "missing.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"missing\.pth.*'blocks\.1\.mlp\.fc2\.weight'"):
        load_vit(path, num_heads=HEADS)
    del sd["cls_token"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="'cls_token'"):
        load_vit(path, num_heads=HEADS)


def test_missing_hf_value_projection(tmp_path: Path) -> None:
    sd = hf_dict(tiny(), dinov2=False)
    del sd["encoder.layer.1.attention.attention.value.weight"]
    path = tmp_path / "hf.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.attention\.value\.weight"):
        load_vit(path, num_heads=HEADS)


def test_unexpected_key(tmp_path: Path) -> None:
    sd = dino_dict(tiny())
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"extra\.pth.*unexpected.*'blocks\.0\.attn\.q_norm\.weight'"):
        load_vit(path, num_heads=HEADS)


def test_shape_mismatch(tmp_path: Path) -> None:
    sd = dino_dict(tiny())
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(100, DIM)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.mlp\.fc1\.weight'.*\(100, 48\).*\(192, 48\)"):
        load_vit(path, num_heads=HEADS)
    torch.save(dino_dict(tiny()), path)
    with pytest.raises(CheckpointError, match=r"'pos_embed'.*\(1, 17, 48\).*\(1, 37, 48\)"):
        load_vit(path, num_heads=HEADS, pos_grid=6)


def test_unknown_layout_heads_and_options(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match=r"other\.pth.*unknown checkpoint layout"):
        load_vit(path)
    torch.save(dino_dict(tiny()), path)
    with pytest.raises(CheckpointError, match="num_heads"):
        load_vit(path)  # width 48 is not a standard one
    with pytest.raises(ConfigError, match="colour"):
        load_vit(path, num_heads=HEADS, colour=3)


class _Exploit:
    """Unpickling this would create ``marker`` (an arbitrary call during unpickling)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**dino_dict(tiny()), "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused.*(builtins|io)\.open.*weights_only"):
        load_vit(path, num_heads=HEADS)
    assert not marker.exists()


# -- named backbones ------------------------------------------------------------------------------


def test_named_backbone_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELWISE_CACHE", str(tmp_path / "cache"))

    def offline(url: str, target: Path) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(vit_loading, "download", offline)
    url = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
    target = tmp_path / "cache" / "dino_deitsmall8_pretrain.pth"
    with pytest.raises(CheckpointError) as info:
        resolve_backbone("dino_vits8")
    assert url in str(info.value) and str(target) in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_vit("dinov2_vits14")
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in str(info.value)
    assert str(tmp_path / "cache" / "dinov2_vits14_pretrain.pth") in str(info.value)

    source = tiny()  # once the file is placed there, the name loads it without any download
    target.parent.mkdir(parents=True)
    torch.save(dino_dict(source), target)
    assert resolve_backbone("dino_vits8") == target
    assert_same_outputs(source, load_vit("dino_vits8", num_heads=HEADS))
    with pytest.raises(CheckpointError, match="dino_vits16"):
        resolve_backbone("dino_vitz99")


def test_named_backbone_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABELWISE_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "server.pth"
    torch.save(dino_dict(tiny()), served)
    calls: list[str] = []
    real_download = vit_loading.download

    def redirected(url: str, target: Path) -> None:
        calls.append(url)
        real_download(served.as_uri(), target)  # the real downloader, on a file:// URL

    monkeypatch.setattr(vit_loading, "download", redirected)
    path = resolve_backbone("dino_vitb16")
    assert path == tmp_path / "cache" / "dino_vitbase16_pretrain.pth"
    assert calls == ["https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"]
    assert path.read_bytes() == served.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # atomic: no partial file left


def test_labelwise_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert vit_loading.DEFAULT_BACKBONE_PATH.parts[-2:] == ("weights", "labelwise_vit.safetensors")
    target = tmp_path / "weights" / "labelwise_vit.safetensors"
    monkeypatch.setattr(vit_loading, "DEFAULT_BACKBONE_PATH", target)
    with pytest.raises(CheckpointError, match=re.escape(str(target))):
        resolve_backbone("labelwise_default")
    source = tiny()
    save_vit(source, target)
    assert resolve_backbone("labelwise_default") == target
    assert_same_outputs(source, load_vit("labelwise_default"))
