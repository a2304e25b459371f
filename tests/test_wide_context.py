"""The wide-context model (issue 27): shapes, the local branch alone equals the plain model, the
cross-attention against a literal computation, token positions by hand."""

from __future__ import annotations

import math

import pytest
import torch

from labelwise.models import create
from labelwise.models.wide_context import (
    ContextOutput,
    CrossAttentionBlock,
    sincos_positions,
    token_positions,
)

LOCAL = {"width": 8, "depth": 3}


def _model(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return create("wide_context", num_classes=4, local="unet", local_options=LOCAL, dim=16, heads=2, layers=2,
                  **options)


def test_shapes_in_training_and_evaluation_and_a_config_round_trip() -> None:
    model = _model()
    images = torch.rand(2, 6, 48, 64)
    output = model.train()(images)
    assert isinstance(output, ContextOutput)
    assert output.logits.shape == output.context_logits.shape == (2, 4, 48, 64)
    assert model.eval()(images).shape == (2, 4, 48, 64)
    rebuilt = create(**model.config())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(images), model(images))
    with pytest.raises(ValueError, match=r"images \[B, 6, H, W\]"):
        model(torch.rand(1, 3, 32, 32))


def test_the_local_branch_alone_equals_the_plain_model() -> None:
    model = _model()
    with torch.no_grad():  # a trained-looking fusion, so that switching the context off is visible
        model.from_tokens.weight.normal_(0, 0.5)
    plain = create("unet", num_classes=4, **LOCAL)
    plain.load_state_dict(model.local.state_dict())
    images = torch.rand(2, 6, 32, 32)
    model.eval()
    plain.eval()
    with_context = model(images)
    model.use_context = False
    assert torch.equal(model(images), plain(images[:, :3]))
    assert not torch.allclose(with_context, plain(images[:, :3]))
    other_context = images.clone()
    other_context[:, 3:] = torch.rand(2, 3, 32, 32)
    model.use_context = True
    assert not torch.allclose(model(other_context), with_context)  # the context is read


def test_an_untrained_fusion_starts_as_the_local_model() -> None:
    model = _model().eval()
    plain = create("unet", num_classes=4, **LOCAL).eval()
    plain.load_state_dict(model.local.state_dict())
    images = torch.rand(1, 6, 32, 32)
    assert torch.equal(model(images), plain(images[:, :3]))


def test_a_separate_context_encoder_starts_from_the_local_weights_and_trains_apart() -> None:
    model = _model(shared_encoder=False)
    local = dict(model.local.encoder.named_parameters())
    for name, param in model.context_encoder.named_parameters():
        assert torch.equal(param, local[name]) and param is not local[name]


def test_cross_attention_block_equals_a_literal_computation() -> None:
    torch.manual_seed(1)
    block = CrossAttentionBlock(dim=8, heads=2).eval()
    x, context = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    expected = torch.empty(2, 5, 8)
    w_q, w_k, w_v = block.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = block.attention.in_proj_bias.chunk(3)
    for b in range(2):
        q = block.norm_query(x[b]) @ w_q.T + b_q
        kv = block.norm_context(context[b])
        k, v = kv @ w_k.T + b_k, kv @ w_v.T + b_v
        heads = []
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            weights = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(4), dim=-1)
            heads.append(weights @ v[:, s])
        attended = torch.cat(heads, dim=1) @ block.attention.out_proj.weight.T + block.attention.out_proj.bias
        y = x[b] + attended
        expected[b] = y + block.mlp(block.norm_mlp(y))
    torch.testing.assert_close(block(x, context), expected, rtol=1e-5, atol=1e-5)


def test_token_positions_place_the_window_in_the_middle_of_its_context() -> None:
    rows, cols = token_positions(4, 2, 1.0, torch.device("cpu"))
    assert rows.reshape(4, 2)[:, 0].tolist() == [0.125, 0.375, 0.625, 0.875]
    assert cols.reshape(4, 2)[0].tolist() == [0.25, 0.75]
    rows, _ = token_positions(4, 4, 3.0, torch.device("cpu"))
    assert rows.reshape(4, 4)[:, 0].tolist() == pytest.approx([-0.625, 0.125, 0.875, 1.625])
    encodings = sincos_positions(torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.0]), 8)
    assert encodings.shape == (2, 8) and torch.equal(encodings[0, 2:4], torch.ones(2))  # cos(0) = 1
