"""The ViT backbone: shapes, attention maps, position embeddings, registers, LayerScale, mask
tokens, attention kernels, configuration, and the ``vit_linear`` segmentation model.

Expected values are recomputed here from the parameters with plain torch functions rather than
taken from the model's own code paths.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from labelwise.errors import ConfigError
from labelwise.models import create
from labelwise.models.vit import VIT_ARCHS, DropPath, VisionTransformer, ViTConfig, create_vit

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
DIM, HEADS = 48, 3


def tiny(patch_size: int = 8, pos_grid: int = 4, depth: int = 2, seed: int = 0, **options) -> VisionTransformer:
    torch.manual_seed(seed)
    config = ViTConfig(arch="custom", embed_dim=DIM, depth=depth, num_heads=HEADS,
                       patch_size=patch_size, pos_grid=pos_grid, **options)
    model = VisionTransformer(config).eval()
    with torch.no_grad():  # non-trivial values everywhere (biases start at zero)
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def block_inputs(model: VisionTransformer, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """The token tensors entering each block, captured with forward pre-hooks."""
    captured: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
             for b in model.blocks]
    try:
        with torch.no_grad():
            model(x, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def reference_attention(model: VisionTransformer, block: int, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head from the block's LayerNorm and qkv weights."""
    b = model.blocks[block]
    normed = F.layer_norm(tokens, (DIM,), b.norm1.weight, b.norm1.bias, eps=1e-6)
    qkv = normed @ b.attn.qkv.weight.T + b.attn.qkv.bias
    q, k = qkv[..., :DIM], qkv[..., DIM:2 * DIM]
    d = DIM // HEADS
    maps = []
    for head in range(HEADS):
        qh, kh = q[..., head * d:(head + 1) * d], k[..., head * d:(head + 1) * d]
        maps.append(torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1))
    return torch.stack(maps, dim=1)


# -- shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [8, 14, 16])
@pytest.mark.parametrize("size", [(37, 53), (32, 32), (9, 15)])
def test_output_shapes(patch: int, size: tuple[int, int]) -> None:
    model = tiny(patch_size=patch)
    height, width = size
    h, w = -(-height // patch), -(-width // patch)
    with torch.no_grad():
        out = model(images(2, height, width), return_attention=[0, -1])
    assert out.cls_token.shape == (2, DIM)
    assert out.patch_tokens.shape == (2, DIM, h, w)
    assert out.register_tokens is None
    assert sorted(out.attentions) == [0, 1]
    assert out.attentions[1].shape == (2, HEADS, 1 + h * w, 1 + h * w)
    assert model.num_prefix_tokens == 1


def test_standard_architectures_and_create_vit() -> None:
    assert VIT_ARCHS["vit_tiny"] == (192, 12, 3)
    assert VIT_ARCHS["vit_small"] == (384, 12, 6)
    assert VIT_ARCHS["vit_base"] == (768, 12, 12)
    model = create_vit("vit_tiny", patch_size=16)
    assert (model.embed_dim, len(model.blocks), model.num_heads, model.patch_size) == (192, 12, 3, 16)
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 192)
    assert model.patch_embed.proj.weight.shape == (192, 3, 16, 16)
    with pytest.raises(ConfigError, match="colour"):
        create_vit("vit_tiny", colour=1)


def test_padding_is_bottom_right_replicate_or_reflect() -> None:
    """forward == forward_tokens on images normalised and padded by hand."""
    model = tiny(patch_size=8)
    x = images(1, 21, 13)
    normed = (x - MEAN) / STD
    padded = F.pad(normed, (0, 3, 0, 3), mode="reflect")  # 21 -> 24, 13 -> 16
    with torch.no_grad():
        out = model(x)
        tokens, _ = model.forward_tokens(padded)
    assert torch.allclose(out.cls_token, tokens[:, 0], atol=1e-6)
    assert torch.allclose(out.patch_tokens.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-6)
    tiny_image = images(1, 3, 5)  # smaller than the padding: replicate
    padded = F.pad((tiny_image - MEAN) / STD, (0, 3, 0, 5), mode="replicate")
    with torch.no_grad():
        assert torch.allclose(model(tiny_image).cls_token, model.forward_tokens(padded)[0][:, 0], atol=1e-6)


# -- tokens and attention ---------------------------------------------------------------------


def test_token_assembly_matches_manual_embedding() -> None:
    model = tiny(patch_size=8, pos_grid=4, num_registers=2)
    x = images(2, 32, 32)
    first = block_inputs(model, x)[0]
    conv = F.conv2d((x - MEAN) / STD, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=8)
    patches = conv.flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
    assert first.shape == (2, 1 + 2 + 16, DIM)
    assert torch.allclose(first[:, 0], (model.cls_token + model.pos_embed[:, :1])[0].expand(2, -1), atol=1e-6)
    assert torch.equal(first[:, 1:3], model.register_tokens.expand(2, -1, -1).detach())  # no position
    assert torch.allclose(first[:, 3:], patches, atol=1e-5)


def test_attention_maps_match_independent_recomputation() -> None:
    model = tiny(patch_size=8, depth=3)
    x = images(2, 40, 24)
    inputs = block_inputs(model, x)
    with torch.no_grad():
        out = model(x, return_attention=[0, -1])
        expected_first = reference_attention(model, 0, inputs[0])
        expected_last = reference_attention(model, 2, inputs[2])
    assert sorted(out.attentions) == [0, 2]  # -1 normalised to depth - 1
    n = 1 + 5 * 3
    for maps, expected in ((out.attentions[0], expected_first), (out.attentions[2], expected_last)):
        assert maps.shape == (2, HEADS, n, n)
        assert torch.allclose(maps.sum(-1), torch.ones(2, HEADS, n), atol=1e-5)
        assert torch.allclose(maps, expected, atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        model(x, return_attention=[3])


def test_attention_output_equals_manual_block() -> None:
    """One whole block recomputed by hand: attention, projection, residuals, MLP with GELU."""
    model = tiny(patch_size=8, depth=2, layer_scale=0.5)
    x = images(1, 16, 24)
    inputs = block_inputs(model, x)
    b = model.blocks[0]
    t = inputs[0]
    with torch.no_grad():
        maps = reference_attention(model, 0, t)
        normed = F.layer_norm(t, (DIM,), b.norm1.weight, b.norm1.bias, eps=1e-6)
        v = (normed @ b.attn.qkv.weight.T + b.attn.qkv.bias)[..., 2 * DIM:]
        d = DIM // HEADS
        heads = [maps[:, i] @ v[..., i * d:(i + 1) * d] for i in range(HEADS)]
        attended = torch.cat(heads, dim=-1) @ b.attn.proj.weight.T + b.attn.proj.bias
        t = t + b.ls1.gamma * attended
        normed = F.layer_norm(t, (DIM,), b.norm2.weight, b.norm2.bias, eps=1e-6)
        hidden = F.gelu(normed @ b.mlp.fc1.weight.T + b.mlp.fc1.bias)
        t = t + b.ls2.gamma * (hidden @ b.mlp.fc2.weight.T + b.mlp.fc2.bias)
    assert torch.allclose(t, inputs[1], atol=1e-5)


# -- position embeddings -----------------------------------------------------------------------


def test_pos_embed_identity_at_stored_grid() -> None:
    model = tiny(pos_grid=4)
    assert model.interpolate_pos_embed(4, 4) is model.pos_embed


def test_pos_embed_interpolation_is_bicubic() -> None:
    model = tiny(pos_grid=4)
    grid = model.pos_embed[0, 1:].detach().reshape(4, 4, DIM).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False)
    expected = expected[0].permute(1, 2, 0).reshape(18, DIM)
    with torch.no_grad():
        got = model.interpolate_pos_embed(6, 3)
    assert got.shape == (1, 1 + 18, DIM)
    assert torch.equal(got[0, 0], model.pos_embed[0, 0].detach())
    assert torch.allclose(got[0, 1:], expected, atol=1e-6)
    with torch.no_grad():  # a constant grid stays constant (bicubic weights sum to one)
        model.pos_embed[:, 1:] = 0.25
        assert torch.allclose(model.interpolate_pos_embed(7, 5)[0, 1:], torch.full((35, DIM), 0.25), atol=1e-6)


def test_forward_uses_interpolated_positions() -> None:
    """A 6x6 patch grid on a 4x4-grid model == a 6x6-grid model holding the resized grid."""
    small = tiny(patch_size=8, pos_grid=4)
    large = tiny(patch_size=8, pos_grid=6)
    state = dict(small.state_dict())
    grid = state["pos_embed"][0, 1:].reshape(4, 4, DIM).permute(2, 0, 1)[None]
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], resized[0].permute(1, 2, 0).reshape(1, 36, DIM)], 1)
    large.load_state_dict(state)
    x = images(2, 48, 48)
    with torch.no_grad():
        assert torch.allclose(small(x).patch_tokens, large(x).patch_tokens, atol=1e-5)


# -- registers, LayerScale, mask tokens --------------------------------------------------------


def test_registers_shapes_and_influence() -> None:
    with_registers = tiny(num_registers=3)
    plain = tiny()
    assert with_registers.register_tokens.shape == (1, 3, DIM)
    assert with_registers.pos_embed.shape == plain.pos_embed.shape  # registers have no position
    assert with_registers.num_prefix_tokens == 4
    plain.load_state_dict({k: v for k, v in with_registers.state_dict().items() if k != "register_tokens"})
    x = images(2, 24, 40)
    with torch.no_grad():
        out = with_registers(x, return_attention=[0])
        ref = plain(x)
        assert out.register_tokens.shape == (2, 3, DIM)
        assert out.attentions[0].shape == (2, HEADS, 1 + 3 + 15, 1 + 3 + 15)
        assert not torch.allclose(out.patch_tokens, ref.patch_tokens, atol=1e-4)  # registers are attended to
        with_registers.register_tokens.mul_(50)
        assert not torch.allclose(with_registers(x).cls_token, out.cls_token, atol=1e-4)


def test_layer_scale_parameters_and_effect() -> None:
    model = tiny(layer_scale=1e-5)
    keys = model.state_dict().keys()
    assert "blocks.0.ls1.gamma" in keys and "blocks.1.ls2.gamma" in keys
    assert torch.equal(model.blocks[0].ls1.gamma.detach(), torch.full((DIM,), 1e-5))
    assert not any(".ls1." in k for k in tiny().state_dict())
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.zero_()
            block.ls2.gamma.zero_()
    x = images(1, 32, 24)
    first = block_inputs(model, x)[0]
    with torch.no_grad():
        out = model(x)
    expected = F.layer_norm(first, (DIM,), model.norm.weight, model.norm.bias, eps=1e-6)  # blocks are identities
    assert torch.allclose(out.cls_token, expected[:, 0], atol=1e-5)
    assert torch.allclose(out.patch_tokens.flatten(2).transpose(1, 2), expected[:, 1:], atol=1e-5)


def test_mask_tokens_replace_masked_patches() -> None:
    model = tiny(mask_token=True, num_registers=1)
    assert model.mask_token.shape == (1, DIM)
    with torch.no_grad():
        model.mask_token.normal_()
    x = images(2, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 15]] = True
    masks[1, 7] = True
    plain = block_inputs(model, x)[0]
    masked = block_inputs(model, x, masks=masks)[0]
    patch_pos = model.pos_embed[0, 1:].detach()
    for b in range(2):
        for i in range(16):
            got = masked[b, 2 + i]
            if masks[b, i]:
                assert torch.allclose(got, model.mask_token[0].detach() + patch_pos[i], atol=1e-6)
            else:
                assert torch.equal(got, plain[b, 2 + i])
    with pytest.raises(ValueError, match="mask token"):
        tiny()(x, masks=masks)
    with pytest.raises(ValueError, match="masks"):
        model(x, masks=masks[:, :4])


# -- kernels, precision, stochastic depth -------------------------------------------------------


def test_matmul_kernel_equals_sdpa_kernel() -> None:
    matmul = tiny(num_registers=2, layer_scale=0.1)
    sdpa = tiny(num_registers=2, layer_scale=0.1, attention_kernel="sdpa")
    sdpa.load_state_dict(matmul.state_dict())
    x = images(2, 37, 29)
    with torch.no_grad():
        a, b = matmul(x, return_attention=[1]), sdpa(x, return_attention=[1])
        c = sdpa(x)
    for got in (b, c):
        assert torch.allclose(a.cls_token, got.cls_token, atol=1e-5)
        assert torch.allclose(a.patch_tokens, got.patch_tokens, atol=1e-5)
    assert torch.allclose(a.attentions[1], b.attentions[1], atol=1e-6)


def test_bf16_autocast_is_close_to_fp32() -> None:
    model = tiny()
    x = images(2, 32, 32)
    with torch.no_grad():
        ref = model(x, return_attention=[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, return_attention=[0])
    assert torch.allclose(low.patch_tokens.float(), ref.patch_tokens, atol=0.15)
    assert torch.allclose(low.attentions[0].float().sum(-1), torch.ones(2, HEADS, 17), atol=0.05)


def test_drop_path_training_only() -> None:
    drop = DropPath(0.5).train()
    x = torch.ones(400, 3, 2)
    y = drop(x)
    per_sample = y[:, 0, 0]
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(y, per_sample.view(-1, 1, 1).expand_as(y))  # whole samples dropped
    assert 120 < int((per_sample == 0).sum()) < 280
    assert torch.equal(drop.eval()(x), x)

    model = tiny(drop_path=0.5)
    assert [b.drop_path.p for b in model.blocks] == [0.0, 0.5]  # linear in depth
    x = images(4, 16, 16)
    with torch.no_grad():
        model.train()
        torch.manual_seed(3)
        first = model(x).patch_tokens
        torch.manual_seed(4)
        second = model(x).patch_tokens
        model.eval()
        assert torch.equal(model(x).patch_tokens, model(x).patch_tokens)
    assert not torch.equal(first, second)


def test_gradients_reach_every_parameter() -> None:
    model = tiny(num_registers=1, layer_scale=0.1).train()
    out = model(images(2, 16, 24))
    (out.patch_tokens.square().mean() + out.cls_token.sum() + out.register_tokens.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# -- configuration ----------------------------------------------------------------------------


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="arch"):
        ViTConfig(arch="vit_enormous")
    with pytest.raises(ConfigError, match="patch_size"):
        ViTConfig(patch_size=0)
    with pytest.raises(ConfigError, match="embed_dim"):
        ViTConfig(embed_dim=100)  # 100 % 6 heads
    with pytest.raises(ConfigError, match="custom"):
        ViTConfig(arch="custom", embed_dim=48)
    with pytest.raises(ConfigError, match="drop_path"):
        ViTConfig(drop_path=1.0)
    with pytest.raises(ConfigError, match="attention_kernel"):
        ViTConfig(attention_kernel="flash")
    with pytest.raises(ConfigError, match="layer_scale"):
        ViTConfig(layer_scale=-1.0)
    with pytest.raises(ConfigError, match="num_registers"):
        ViTConfig(num_registers=-1)
    with pytest.raises(ConfigError, match="pos_grid"):
        ViTConfig(pos_grid=0)
    with pytest.raises(ConfigError, match="bogus"):
        ViTConfig.from_dict({"bogus": 1})


def test_config_round_trip_and_resolution() -> None:
    config = ViTConfig(arch="vit_small", patch_size=14, num_registers=4, layer_scale=1e-5, pos_grid=37,
                       mask_token=True)
    assert config.dims == (384, 12, 6)
    resolved = config.resolved()
    assert (resolved.embed_dim, resolved.depth, resolved.num_heads) == (384, 12, 6)
    data = json.loads(json.dumps(config.to_dict()))
    assert ViTConfig(**data) == config
    assert ViTConfig(num_heads=12).dims == (384, 12, 12)


def test_input_checks() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="dtype|uint8"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model.forward_tokens(torch.rand(1, 3, 17, 16))


# -- segmentation model -----------------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_vit_linear_through_create(head: str) -> None:
    if head == "linear":  # the full ViT-T/16
        model = create("vit_linear", num_classes=5, arch="vit_tiny", patch_size=16).eval()
        assert len(model.encoder.blocks) == 12
    else:
        model = create("vit_linear", num_classes=5, arch="vit_tiny", patch_size=16, depth=2, head=head,
                       head_width=16).eval()
        assert len(model.encoder.blocks) == 2
    with torch.no_grad():
        for batch, height, width in [(2, 37, 53), (1, 16, 16), (1, 9, 31)]:
            assert model(images(batch, height, width)).shape == (batch, 5, height, width)
    assert model.config()["name"] == "vit_linear"
    assert create(**model.config()).config() == model.config()
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    assert isinstance(model.encoder, VisionTransformer)
    assert {id(p) for p in model.encoder_parameters()} == encoder_ids
    assert all(id(p) not in encoder_ids for p in model.decoder_parameters())


def test_vit_linear_normalises_once_and_upsamples_bilinearly() -> None:
    model = create("vit_linear", num_classes=3, arch="custom", embed_dim=DIM, depth=2, num_heads=HEADS,
                   patch_size=14, num_registers=2, layer_scale=1e-5, pos_grid=5).eval()
    assert model.encoder.num_registers == 2 and model.output_stride == 14
    x = images(2, 30, 50)
    with torch.no_grad():
        features = model.encode(x)[0]
        assert torch.allclose(features, model.encoder(x).patch_tokens, atol=1e-5)
        logits = model(x)
        coarse = model.head(features)
        expected = F.interpolate(coarse, size=(42, 56), mode="bilinear", align_corners=False)[..., :30, :50]
    assert torch.allclose(logits, expected, atol=1e-5)
    model.train()
    model(x).mean().backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
