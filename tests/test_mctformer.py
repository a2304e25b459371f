"""Multi-class-token ViT: class-token initialisation, equivalence with the backbone for one
token, attention slices against a literal recomputation, the multi-label loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from labelwise.models.base import pad_to_multiple
from labelwise.models.mctformer import MultiClassTokenViT, class_to_patch_attention, mct_loss, patch_to_patch_attention
from labelwise.models.vit import VisionTransformer, ViTConfig


def _backbone(seed: int = 0, registers: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig(arch="custom", embed_dim=16, depth=2, num_heads=2, patch_size=8, pos_grid=3,
                                        num_registers=registers)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def test_class_tokens_start_as_copies_of_the_pretrained_token_and_position() -> None:
    backbone = _backbone()
    model = MultiClassTokenViT(backbone, num_classes=4, variant="v1")
    for k in range(4):
        assert torch.equal(model.class_tokens[0, k], backbone.cls_token[0, 0])
        assert torch.equal(model.class_pos[0, k], backbone.pos_embed[0, 0])
    model.class_tokens.data.add_(1.0)  # copies, not views
    assert not torch.equal(model.class_tokens[0, 0], backbone.cls_token[0, 0])


def test_one_class_token_reproduces_the_backbone() -> None:
    backbone = _backbone(seed=1)
    model = MultiClassTokenViT(backbone, num_classes=1, variant="v1").eval()
    images = torch.rand(2, 3, 24, 20)
    with torch.no_grad():
        ours = model(images, return_attention=[0, 1])
        reference = backbone(images, return_attention=[0, 1])
    torch.testing.assert_close(ours.class_tokens[:, 0], reference.cls_token)
    torch.testing.assert_close(ours.patch_tokens, reference.patch_tokens)
    torch.testing.assert_close(ours.scores[:, 0], reference.cls_token.mean(-1))
    torch.testing.assert_close(ours.attentions[1], reference.attentions[1])
    assert ours.patch_cams is None and ours.patch_scores is None


def _literal_attentions(model: MultiClassTokenViT, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's attention recomputed head by head with explicit dot products."""
    backbone = model.backbone
    x = pad_to_multiple((images - backbone.pixel_mean) / backbone.pixel_std, backbone.patch_size)
    h, w = x.shape[-2] // 8, x.shape[-1] // 8
    patches = backbone.patch_embed(x).flatten(2).transpose(1, 2) + backbone.interpolate_pos_embed(h, w)[:, 1:]
    tokens = torch.cat([(model.class_tokens + model.class_pos).expand(len(images), -1, -1), patches], 1)
    maps = []
    heads, dim = backbone.num_heads, backbone.embed_dim
    d = dim // heads
    for block in backbone.blocks:
        qkv = block.attn.qkv(block.norm1(tokens))
        n = tokens.shape[1]
        attention = torch.zeros(len(images), heads, n, n)
        for b in range(len(images)):
            for head in range(heads):
                q = qkv[b, :, head * d:(head + 1) * d]
                k = qkv[b, :, dim + head * d:dim + (head + 1) * d]
                for i in range(n):
                    logits = torch.stack([q[i] @ k[j] / math.sqrt(d) for j in range(n)])
                    attention[b, head, i] = torch.softmax(logits, 0)
        maps.append(attention)
        tokens, _ = block(tokens)
    return maps


def test_attention_slices_match_a_literal_computation() -> None:
    model = MultiClassTokenViT(_backbone(seed=2), num_classes=3, variant="v2").eval()
    with torch.no_grad():
        model.class_tokens.add_(0.3 * torch.randn_like(model.class_tokens))  # distinct tokens
        images = torch.rand(2, 3, 16, 24)
        output = model(images, return_attention=[0, 1])
        literal = _literal_attentions(model, images)
    k, prefix, patches = 3, model.num_prefix_tokens, 2 * 3
    expected_c2p = torch.zeros(2, k, patches)
    expected_p2p = torch.zeros(2, patches, patches)
    for attention in literal:
        for b in range(2):
            for c in range(k):
                for p in range(patches):
                    expected_c2p[b, c, p] += sum(attention[b, hd, c, prefix + p] for hd in range(2)) / 2
            for p in range(patches):
                for q in range(patches):
                    expected_p2p[b, p, q] += sum(attention[b, hd, prefix + p, prefix + q] for hd in range(2)) / 2
    torch.testing.assert_close(class_to_patch_attention(output.attentions, [0, 1], k, prefix), expected_c2p,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(patch_to_patch_attention(output.attentions, [0, 1], prefix), expected_p2p,
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(KeyError, match="blocks"):
        class_to_patch_attention(output.attentions, [0, 5], k, prefix)


def test_v2_patch_scores_and_the_loss_by_hand() -> None:
    model = MultiClassTokenViT(_backbone(seed=3, registers=2), num_classes=3, variant="v2")
    images = torch.rand(2, 3, 24, 24)
    tags = torch.tensor([[1, 0, 1], [0, 1, 0]])
    output = model(images)
    assert output.patch_cams.shape == (2, 3, 3, 3) and output.class_tokens.shape == (2, 3, 16)
    torch.testing.assert_close(output.patch_scores, output.patch_cams.mean((2, 3)))

    def soft_margin(x: torch.Tensor) -> torch.Tensor:
        y = tags.float()
        return -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean(1).mean()

    loss = mct_loss(output, tags)
    torch.testing.assert_close(loss, soft_margin(output.scores) + soft_margin(output.patch_scores))
    loss.backward()
    assert model.class_tokens.grad is not None and model.class_tokens.grad.abs().sum() > 0
    assert model.patch_head.weight.grad is not None


def test_hybrid_stem_keeps_the_token_grid_and_the_encoder_weights() -> None:
    from labelwise.models.mctformer import ConvStem

    backbone = _backbone(seed=4)
    block_weight = backbone.blocks[0].attn.qkv.weight.detach().clone()
    model = MultiClassTokenViT(backbone, num_classes=2, variant="v2", hybrid=True)
    assert isinstance(model.backbone.patch_embed, ConvStem)
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, block_weight)
    output = model(torch.rand(2, 3, 24, 40))
    assert output.patch_tokens.shape == (2, 16, 3, 5)  # stride 8, as the patch embedding it replaces
    stem = ConvStem(3, 16, 16)
    assert stem(torch.rand(1, 3, 32, 48)).shape == (1, 16, 2, 3)
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(3, 16, 14)


def test_linear_readout_starts_as_the_mean_and_is_a_weighted_sum() -> None:
    backbone = _backbone(seed=5)
    model = MultiClassTokenViT(backbone, num_classes=3, variant="v1", readout="linear")
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        output = model(images)
        torch.testing.assert_close(output.scores, output.class_tokens.mean(-1))
        model.score_weight.copy_(torch.randn(3, 16))
        model.score_bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        output = model(images)
    tokens, weight = output.class_tokens, model.score_weight.detach()
    expected = torch.zeros(2, 3)
    for b in range(2):
        for k in range(3):
            expected[b, k] = sum(float(tokens[b, k, d]) * float(weight[k, d]) for d in range(16))
            expected[b, k] += float(model.score_bias.detach()[k])
    torch.testing.assert_close(output.scores, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="readout"):
        MultiClassTokenViT(_backbone(), num_classes=2, readout="max")  # type: ignore[arg-type]


def test_mean_readout_gives_no_gradient_to_the_class_tokens_under_a_uniform_final_norm() -> None:
    """Why the linear readout exists: mean(LayerNorm(x)) with a uniform gamma is mean(beta) for
    every x, so the class-token loss cannot move the class tokens."""
    tags = torch.tensor([[1, 0, 1], [0, 1, 1]])
    images = torch.rand(2, 3, 16, 16)
    gradients = {}
    for readout in ("mean", "linear"):
        backbone = _backbone(seed=6)
        with torch.no_grad():
            backbone.norm.weight.fill_(1.3)
        model = MultiClassTokenViT(backbone, num_classes=3, variant="v1", readout=readout)  # type: ignore[arg-type]
        if readout == "linear":
            with torch.no_grad():
                model.score_weight.add_(0.1 * torch.randn_like(model.score_weight))
        mct_loss(model(images), tags).backward()
        gradients[readout] = model.class_tokens.grad.abs().max()
    assert gradients["mean"] < 1e-6
    assert gradients["linear"] > 1e-3


def test_new_parameters_are_the_added_ones() -> None:
    backbone = _backbone(seed=7)
    pretrained = {f"backbone.{name}" for name, _ in backbone.named_parameters()}
    model = MultiClassTokenViT(backbone, num_classes=3, variant="v2", hybrid=True)
    new = {name for name, _ in model.named_parameters() if model.is_new_parameter(name)}
    stem = {name for name, _ in model.named_parameters() if name.startswith("backbone.patch_embed.")}
    added = {name for name, _ in model.named_parameters()} - pretrained
    assert new == added | stem and stem and {"class_tokens", "score_weight", "patch_head.weight"} <= new
    plain = MultiClassTokenViT(_backbone(seed=7), num_classes=3, variant="v1")
    assert not any(plain.is_new_parameter(n) for n, _ in plain.named_parameters() if n.startswith("backbone."))
