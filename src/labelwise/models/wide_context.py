"""Wide-context segmentation: a window segmented with what a much larger area around it shows.

After WiCoNet (Ding et al., "Looking Outside the Window: Wide-Context Transformer for the Semantic
Segmentation of High-Resolution Remote Sensing Images", IEEE TGRS 2022): a *local* branch
segments the window; a *context* branch encodes a window ``context_scale`` times larger around
it, downsampled to the window's size; a *context transformer* (cross-attention: the local tokens
ask, the context tokens answer) passes what the wide area shows into the local features before
they are decoded; an auxiliary classifier on the context features adds the paper's context
loss during training.

Input: ``[B, 2 * in_channels, H, W]``, the window's channels then its context's (the context
window, centred on the window, resized to ``H x W``), so that every pipeline made for one image
tensor (collation, padding, devices) carries both. Where this differs from the paper's code:

- the local branch is any labelwise encoder-decoder (the ImageNet-encoder U-Net by default) and
  the fusion happens at its deepest encoder map, so its decoder and skips are unchanged;
- the context encoder is the local encoder itself (``shared_encoder``, default) or a copy of it
  starting from the same weights, where the paper trains a separate small CNN;
- positions are fixed 2-D sine/cosine encodings of each token's place on the ground (local
  windows as the unit, context tokens spread over ``context_scale`` windows), not learned
  tables, so any window size works and the transformer knows where the window sits in its context;
- the transformer's output is added to the local features through a projection that starts at
  zero: an untrained wide-context model equals its local model, and ``use_context=False``
  gives the local model's output exactly.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.models.base import SegmentationModel, create, register_model
from labelwise.models.encoders import batchnorm_to_eval


class ContextOutput(NamedTuple):
    """Training output of :class:`WideContextSegmenter`: ``logits [B, K, H, W]`` of the window
    and ``context_logits [B, K, H, W]`` of its (downsampled) context window, for the auxiliary
    context loss."""

    logits: Tensor
    context_logits: Tensor


def sincos_positions(rows: Tensor, cols: Tensor, dim: int) -> Tensor:
    """Fixed encodings ``[N, dim]`` of 2-D positions ``(rows[n], cols[n])`` (any real units):
    ``dim / 4`` frequencies (geometric, periods 2 to 256 units / 64) per axis, sine and cosine."""
    if dim % 4:
        raise ValueError(f"sincos_positions: dim must be a multiple of 4, got {dim}")
    count = dim // 4
    frequencies = torch.pi * 64.0 ** (-torch.arange(count, dtype=torch.float32, device=rows.device) / max(count, 1))
    angles_r = rows.float()[:, None] * frequencies[None] * 64.0
    angles_c = cols.float()[:, None] * frequencies[None] * 64.0
    return torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], dim=1)


def token_positions(height: int, width: int, scale: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Centres ``(rows, cols)`` ``[height * width]`` of a ``height x width`` token grid covering
    ``scale`` windows and centred on the window, in windows (the window spans [0, 1])."""
    offset = (scale - 1.0) / 2.0
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * scale - offset
    cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * scale - offset
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    return grid_r.reshape(-1), grid_c.reshape(-1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: ``x + MHA(LN(x), LN(context))`` then ``x + MLP(LN(x))``; ``x [B, N, D]``,
    ``context [B, M, D]``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(dim, eps=1e-6)
        self.norm_context = nn.LayerNorm(dim, eps=1e-6)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        kv = self.norm_context(context)
        attended, _ = self.attention(self.norm_query(x), kv, kv, need_weights=False)
        x = x + attended
        return x + self.mlp(self.norm_mlp(x))


class ContextTransformer(nn.Module):
    """``layers`` cross-attention blocks from local to context tokens and a final LayerNorm."""

    def __init__(self, dim: int, heads: int, layers: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads, dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, context)
        return self.norm(x)


@register_model("wide_context")
class WideContextSegmenter(SegmentationModel):
    """A local encoder-decoder whose deepest features attend to a wide context (module docstring).

    Args:
        num_classes: output classes.
        in_channels: channels of the window and of the context each (the input has twice as many).
        local: the registered local model (``unet``, ``deeplabv3plus``, ...), built with
            ``local_options`` (e.g. ``{"encoder": "mobilenet_v2", "encoder_weights": "imagenet"}``).
        context_scale: the context window's side in windows (3: three times wider and taller).
        shared_encoder: encode the context with the local encoder (True) or with a copy of it.
        dim, heads, layers: width, attention heads and depth of the context transformer.
        use_context: False switches the context off (the local model's output exactly).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, local: str = "unet",
                 local_options: dict[str, Any] | None = None, context_scale: float = 3.0,
                 shared_encoder: bool = True, dim: int = 128, heads: int = 4, layers: int = 2,
                 use_context: bool = True) -> None:
        if local == "wide_context":
            raise ValueError("wide_context: the local model cannot itself be wide_context")
        if not context_scale >= 1.0:
            raise ValueError(f"wide_context: context_scale must be >= 1, got {context_scale}")
        super().__init__(num_classes, in_channels, local=local, local_options=dict(local_options or {}),
                         context_scale=float(context_scale), shared_encoder=bool(shared_encoder), dim=int(dim),
                         heads=int(heads), layers=int(layers), use_context=bool(use_context))
        self.local = create(local, num_classes=num_classes, in_channels=in_channels, **dict(local_options or {}))
        self.output_stride = self.local.output_stride
        #: the local encoder's pretrained BatchNorm is folded: training keeps it frozen by default
        self.folded_batchnorm = bool(getattr(self.local, "folded_batchnorm", False))
        self.context_scale = float(context_scale)
        self.use_context = bool(use_context)
        self.context_encoder = None if shared_encoder else copy.deepcopy(self.local.encoder)
        self.local.eval()  # the probe must not touch BatchNorm statistics (pretrained ones included)
        with torch.no_grad():
            channels = self.local.encode(torch.zeros(1, in_channels, 64, 64))[-1].shape[1]
        self.local.train()
        self.to_tokens = nn.Conv2d(channels, dim, 1)
        self.context_to_tokens = nn.Conv2d(channels, dim, 1)
        self.transformer = ContextTransformer(dim, heads, layers)
        self.from_tokens = nn.Conv2d(dim, channels, 1)
        nn.init.zeros_(self.from_tokens.weight)  # starts as the local model: the context adds nothing yet
        nn.init.zeros_(self.from_tokens.bias)
        self.context_classifier = nn.Conv2d(channels, num_classes, 1)

    @property
    def encoder(self) -> nn.Module:  # type: ignore[override]
        """The local encoder (what pretrained weights initialise and transfer settings freeze)."""
        return self.local.encoder

    def freeze_encoder(self) -> None:
        """Freeze the local encoder and the context encoder (when it is a copy) alike."""
        if self.context_encoder is not None:
            for param in self.context_encoder.parameters():
                param.requires_grad_(False)
        super().freeze_encoder()

    def train(self, mode: bool = True) -> "WideContextSegmenter":
        """As :meth:`SegmentationModel.train`; frozen encoder BatchNorm covers the context
        encoder copy too."""
        super().train(mode)
        if getattr(self, "_encoder_bn_frozen", False) and self.context_encoder is not None:
            batchnorm_to_eval(self.context_encoder)
        return self

    def split(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, 2C, H, W]`` -> (window ``[B, C, H, W]``, context ``[B, C, H, W]``)."""
        if images.dim() != 4 or images.shape[1] != 2 * self.in_channels:
            raise ValueError(f"wide_context expects images [B, {2 * self.in_channels}, H, W] (the window's "
                             f"{self.in_channels} channels, then its context's), got {tuple(images.shape)}")
        return images[:, : self.in_channels], images[:, self.in_channels:]

    def context_features(self, context: Tensor) -> Tensor:
        """The deepest encoder map of the context ``[B, C, H, W]``."""
        if self.context_encoder is None:
            return self.local.encode(context)[-1]
        return self.context_encoder(self.local.preprocess(context))[-1]

    def fuse(self, deepest: Tensor, context: Tensor) -> Tensor:
        """Local deepest features ``[B, C, h, w]`` plus what their context tokens ``[B, C, hc, wc]``
        tell them (cross-attention with ground-position encodings)."""
        batch, _, height, width = deepest.shape
        dim = self.to_tokens.out_channels
        rows, cols = token_positions(height, width, 1.0, deepest.device)
        local_tokens = self.to_tokens(deepest).flatten(2).transpose(1, 2) + sincos_positions(rows, cols, dim)
        c_rows, c_cols = token_positions(context.shape[-2], context.shape[-1], self.context_scale, deepest.device)
        context_tokens = (self.context_to_tokens(context).flatten(2).transpose(1, 2)
                          + sincos_positions(c_rows, c_cols, dim))
        fused = self.transformer(local_tokens.to(deepest.dtype), context_tokens.to(deepest.dtype))
        return deepest + self.from_tokens(fused.transpose(1, 2).reshape(batch, dim, height, width))

    def encode_with_context(self, images: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """``images [B, 2C, H, W]`` -> (the local encoder's maps of the window, the deepest fused
        with the context; the context's deepest map ``[B, C', h, w]``, None when the context is
        switched off)."""
        window, context = self.split(images)
        features = self.local.encode(window)
        if not self.use_context:
            return features, None
        context_map = self.context_features(context)
        return [*features[:-1], self.fuse(features[-1], context_map)], context_map

    def encode(self, images: Tensor) -> list[Tensor]:
        """The window's encoder maps with the context fused in (:meth:`encode_with_context`), so
        that methods which perturb or reuse features (UniMatch, rotation heads) see the context."""
        return self.encode_with_context(images)[0]

    def decode(self, features: list[Tensor], size: Sequence[int] | None = None) -> Tensor:
        """The local decoder on :meth:`encode`'s maps -> logits ``[B, K, H, W]``."""
        return self.local.decode(features, size=size)

    def context_head(self, context_map: Tensor, size: Sequence[int]) -> Tensor:
        """Auxiliary logits ``[B, K, H, W]`` of the context window from its deepest map."""
        return F.interpolate(self.context_classifier(context_map), size=tuple(int(s) for s in size),
                             mode="bilinear", align_corners=False)

    def forward(self, images: Tensor) -> Tensor | ContextOutput:  # type: ignore[override]
        """``images [B, 2C, H, W]`` in [0, 1] -> logits ``[B, K, H, W]`` (in training mode with
        the context switched on: a :class:`ContextOutput` with the context's logits too)."""
        features, context_map = self.encode_with_context(images)
        size = images.shape[-2:]
        logits = self.decode(features, size=size)
        if not self.training or context_map is None:
            return logits
        return ContextOutput(logits, self.context_head(context_map, size))

__all__ = ["ContextOutput", "ContextTransformer", "CrossAttentionBlock", "WideContextSegmenter", "sincos_positions",
           "token_positions"]
