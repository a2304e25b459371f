"""Multi-class-token Transformer (MCTformer, CVPR 2022): a ViT classifier whose class-to-patch
attention localises each class, for weak supervision from image-level tags.

``MultiClassTokenViT(backbone, num_classes, variant)`` wraps any labelwise
:class:`~labelwise.models.vit.VisionTransformer` (own pretrained, DINO, DeiT layouts loaded by
``labelwise.models.vit_loading``): its single class token is replaced by ``K = num_classes``
class tokens, each initialised from the pretrained class token, with position embeddings
initialised from the class token's. ``forward(images [B, 3, H, W] in [0, 1])`` returns an
:class:`MCTOutput`:

- ``class_tokens [B, K, D]`` (after the final norm) and ``scores [B, K]``, the class logits read
  from them: ``readout="mean"`` is the paper's mean over the embedding of each output class token;
  ``readout="linear"`` is a per-class weighted sum plus bias, ``scores_k = w_k . t_k + b_k``,
  initialised to that mean (``w_k = 1 / D``, ``b_k = 0``). Why ``linear`` exists: the mean of a
  LayerNorm output is ``mean(gamma * x_hat) + mean(beta)``, so with a final-norm ``gamma`` that
  is nearly uniform (the labelwise default ViT's: std 0.026) the mean readout is almost constant,
  its gradient to the class tokens almost zero, and the class tokens stay copies of one another
  for hundreds of steps; the paper's 60 epochs on DeiT weights (a far from uniform ``gamma``)
  hide this. A parameter of scale ``1 / D`` per embedding entry moves at Adam's step size, so
  ``w_k`` separates the classes within tens of steps;
- ``patch_tokens [B, D, h, w]``;
- variant ``v2`` only: ``patch_cams [B, K, h, w]`` from a 3x3 convolution on the patch tokens
  and ``patch_scores [B, K]``, their global average (logits of the same classes);
- ``attentions {block: [B, heads, N, N]}`` of the requested blocks, token order
  ``[K class tokens, R registers, h * w patches]``.

``stem`` replaces the ViT's linear patch embedding by a CNN whose output grid (stride = the patch
size) becomes the tokens of the Transformer encoder: ``"scratch"`` (``hybrid=True`` in older
folders) a small :class:`ConvStem` trained from scratch; a :class:`PretrainedCNNStem` module, the
seed documents' hybrid: a pretrained CNN extracts the features, the Transformer (with its
pretrained weights) learns the relations between them, both trained on the tags.

:func:`mct_loss` is the multi-label soft-margin loss of ``scores`` (plus that of
``patch_scores`` for v2) against ``[B, K]`` tags; :func:`class_to_patch_attention` and
:func:`patch_to_patch_attention` cut the CAM ingredients out of the attention maps.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.models.base import pad_to_multiple
from labelwise.models.encoders import batchnorm_to_eval, build_encoder
from labelwise.models.vit import VisionTransformer

__all__ = ["ConvStem", "MCTOutput", "MultiClassTokenViT", "PretrainedCNNStem", "class_to_patch_attention",
           "mct_loss", "patch_to_patch_attention"]


class ConvStem(nn.Module):
    """CNN stem ``[B, C, H, W] -> [B, D, H / p, W / p]`` for a power-of-two patch size ``p``:
    ``log2(p)`` 3x3 stride-2 convolutions (BatchNorm, ReLU; widths doubling up to ``D / 2``), then a
    1x1 projection to ``D``. Drop-in for the ViT's patch embedding (the same output grid)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"the convolutional stem needs a power-of-two patch size, got {patch_size}")
        stages = patch_size.bit_length() - 1
        widths = [max(8, embed_dim // 2 ** (stages - i)) for i in range(stages)]
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            previous = width
        layers.append(nn.Conv2d(previous, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class PretrainedCNNStem(nn.Module):
    """A pretrained CNN encoder as a ViT's patch embedding: ``[B, 3, H, W] -> [B, D, H / p, W / p]``.

    Its input is the image as the ViT normalised it (``input_mean`` / ``input_std``); the stem
    maps it back to [0, 1] and normalises it by the CNN weights' own convention, runs the encoder
    at output stride ``p`` (dilated beyond) and projects its last stage to ``D`` with a 1x1
    convolution (new, trained from scratch). ``p`` must be 8 or 16. A pretrained encoder's
    BatchNorm layers stay in eval mode through ``train()`` (see :mod:`labelwise.models.cnn_cam`).

    Args:
        embed_dim: ``D``, the Transformer's width.
        patch_size: ``p``, the ViT's patch size.
        input_mean, input_std: the ViT's input normalisation (3 values each).
        encoder: CNN architecture (``labelwise.models.encoders.ENCODERS``).
        weights: its pretrained weights (``imagenet``, ``mobilenet_v2_imagenet``, a file) or None.
    """

    def __init__(self, embed_dim: int, patch_size: int, input_mean: Sequence[float], input_std: Sequence[float],
                 encoder: str = "mobilenet_v2", weights: str | None = "imagenet") -> None:
        super().__init__()
        if patch_size not in (8, 16):
            raise ValueError(f"a pretrained CNN stem needs patch size 8 or 16, got {patch_size}")
        self.encoder, convention = build_encoder(encoder, weights, output_stride=patch_size)
        self.encoder_name, self.weights_name = encoder, weights
        self.register_buffer("input_mean", torch.tensor(list(input_mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(list(input_std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("cnn_mean", torch.tensor(convention.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("cnn_std", torch.tensor(convention.std).view(1, 3, 1, 1), persistent=False)
        self.proj = nn.Conv2d(int(self.encoder.channels[-1]), embed_dim, 1)

    def train(self, mode: bool = True) -> "PretrainedCNNStem":
        super().train(mode)
        if self.weights_name is not None:  # pretrained statistics are kept; a random-init encoder learns its own
            batchnorm_to_eval(self.encoder)
        return self

    def describe(self) -> dict[str, object]:
        return {"type": "pretrained_cnn", "encoder": self.encoder_name, "weights": self.weights_name}

    def forward(self, x: Tensor) -> Tensor:
        images = x * self.input_std + self.input_mean
        return self.proj(self.encoder((images - self.cnn_mean) / self.cnn_std)[-1])


class MCTOutput(NamedTuple):
    """What :meth:`MultiClassTokenViT.forward` returns (module docstring)."""

    class_tokens: Tensor
    scores: Tensor
    patch_tokens: Tensor
    patch_cams: Tensor | None
    patch_scores: Tensor | None
    attentions: dict[int, Tensor]


class MultiClassTokenViT(nn.Module):
    """``K`` class tokens on a ViT backbone (module docstring). The backbone's own ``cls_token``
    is kept (frozen: unused, it would get no gradient, which DistributedDataParallel refuses); its
    other parameters are shared (trained together)."""

    def __init__(self, backbone: VisionTransformer, num_classes: int, variant: Literal["v1", "v2"] = "v2",
                 hybrid: bool = False, readout: Literal["mean", "linear"] = "linear",
                 stem: PretrainedCNNStem | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if variant not in ("v1", "v2"):
            raise ValueError(f"variant must be 'v1' or 'v2', got {variant!r}")
        if readout not in ("mean", "linear"):
            raise ValueError(f"readout must be 'mean' or 'linear', got {readout!r}")
        self.backbone = backbone
        backbone.cls_token.requires_grad_(False)
        self.num_classes = num_classes
        self.variant = variant
        with torch.no_grad():
            self.class_tokens = nn.Parameter(backbone.cls_token.detach().clone().repeat(1, num_classes, 1))
            self.class_pos = nn.Parameter(backbone.pos_embed[:, :1].detach().clone().repeat(1, num_classes, 1))
        self.patch_head = nn.Conv2d(backbone.embed_dim, num_classes, 3, padding=1) if variant == "v2" else None
        self.readout = readout
        self.score_weight = self.score_bias = None
        if readout == "linear":
            self.score_weight = nn.Parameter(torch.full((num_classes, backbone.embed_dim), 1.0 / backbone.embed_dim))
            self.score_bias = nn.Parameter(torch.zeros(num_classes))
        if hybrid and stem is not None:
            raise ValueError("give either hybrid=True (a scratch convolutional stem) or a pretrained stem, not both")
        self.hybrid = hybrid
        self.pretrained_stem = stem is not None
        if hybrid:
            backbone.patch_embed = ConvStem(backbone.config.in_channels, backbone.embed_dim,  # type: ignore[assignment]
                                            backbone.patch_size)
        elif stem is not None:
            backbone.patch_embed = stem  # type: ignore[assignment]

    @property
    def cam_stride(self) -> int:
        """Pixels per CAM position (the patch size)."""
        return self.backbone.patch_size

    def stem_description(self) -> dict[str, object] | None:
        """``model.json``'s record of a pretrained CNN stem (None for the ViT's own embedding or a scratch stem)."""
        stem = self.backbone.patch_embed
        return stem.describe() if isinstance(stem, PretrainedCNNStem) else None

    def is_new_parameter(self, name: str) -> bool:
        """Whether the parameter ``name`` (as in ``named_parameters()``) is not from the pretrained
        backbone: the class tokens and their positions, the score readout, the patch classifier
        and the scratch stem (these may train at a higher learning rate); of a pretrained CNN stem
        only its projection is new."""
        new = ("class_tokens", "class_pos", "score_weight", "score_bias", "patch_head.")
        if self.pretrained_stem:
            return name.startswith(new) or name.startswith("backbone.patch_embed.proj.")
        return name.startswith(new) or (self.hybrid and name.startswith("backbone.patch_embed."))

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the ``K`` class tokens and the registers."""
        return self.num_classes + self.backbone.num_registers

    def forward(self, images: Tensor, return_attention: Sequence[int] = ()) -> MCTOutput:
        """``images [B, 3, H, W]`` in [0, 1] (padded bottom/right to the patch size as the
        backbone pads) -> :class:`MCTOutput`."""
        backbone = self.backbone
        if images.dim() != 4 or images.shape[1] != backbone.config.in_channels:
            raise ValueError(f"expected images [B, {backbone.config.in_channels}, H, W], got {list(images.shape)}")
        x = pad_to_multiple((images - backbone.pixel_mean) / backbone.pixel_std, backbone.patch_size)
        tokens, attentions = backbone.forward_tokens(x, return_attention=return_attention,
                                                     class_tokens=self.class_tokens + self.class_pos)
        h, w = x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size
        class_tokens = tokens[:, :self.num_classes]
        patches = tokens[:, self.num_prefix_tokens:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        patch_cams = patch_scores = None
        if self.patch_head is not None:
            patch_cams = self.patch_head(patches)
            patch_scores = patch_cams.mean((2, 3))
        return MCTOutput(class_tokens, self.class_scores(class_tokens), patches, patch_cams, patch_scores, attentions)

    def class_scores(self, class_tokens: Tensor) -> Tensor:
        """``class_tokens [B, K, D]`` -> logits ``[B, K]`` by the configured readout."""
        if self.score_weight is None or self.score_bias is None:
            return class_tokens.mean(-1)
        weight, bias = self.score_weight.to(class_tokens.dtype), self.score_bias.to(class_tokens.dtype)
        return (class_tokens * weight).sum(-1) + bias


def mct_loss(output: MCTOutput, tags: Tensor) -> Tensor:
    """Multi-label soft-margin loss of the class-token scores against ``tags [B, K]`` (0/1),
    plus the same loss of the patch scores for v2."""
    target = tags.to(output.scores.dtype)
    loss = F.multilabel_soft_margin_loss(output.scores.float(), target.float())
    if output.patch_scores is not None:
        loss = loss + F.multilabel_soft_margin_loss(output.patch_scores.float(), target.float())
    return loss


def _mean_over_heads(attentions: dict[int, Tensor], blocks: Sequence[int]) -> Tensor:
    missing = [b for b in blocks if b not in attentions]
    if missing:
        raise KeyError(f"attention of blocks {missing} was not returned (pass them as return_attention)")
    return torch.stack([attentions[b].float().mean(1) for b in blocks]).sum(0)  # [B, N, N]


def class_to_patch_attention(attentions: dict[int, Tensor], blocks: Sequence[int], num_classes: int,
                             num_prefix_tokens: int) -> Tensor:
    """``[B, K, h * w]``: attention of each class token to each patch, averaged over heads and
    summed over ``blocks`` (``attn[:K, prefix:]``)."""
    return _mean_over_heads(attentions, blocks)[:, :num_classes, num_prefix_tokens:]


def patch_to_patch_attention(attentions: dict[int, Tensor], blocks: Sequence[int], num_prefix_tokens: int) -> Tensor:
    """``[B, h * w, h * w]``: patch-to-patch attention averaged over heads and summed over
    ``blocks`` (``attn[prefix:, prefix:]``), the affinity that refines the CAMs."""
    return _mean_over_heads(attentions, blocks)[:, num_prefix_tokens:, num_prefix_tokens:]
