"""Vision Transformer (ViT) backbone, parameter-compatible with DINO and DINOv2.

``VisionTransformer(ViTConfig(arch="vit_small", patch_size=16))`` maps images
``[B, 3, H, W]`` (RGB in [0, 1], unnormalised, any size) to a ``ViTOutput``:

- ``cls_token [B, D]`` and ``patch_tokens [B, D, h, w]`` (after the final LayerNorm),
  ``h = ceil(H / patch)``, ``w = ceil(W / patch)``;
- ``attentions {block: [B, heads, N, N]}`` for the blocks asked for, ``N = 1 + R + h * w``;
- ``register_tokens [B, R, D]`` (DINOv2 registers) or None.

Token order is ``[cls, registers..., patches (row-major)]``. The stored position embedding
covers the class token and a ``pos_grid x pos_grid`` patch grid (registers have none, as in
DINOv2); other grids are interpolated bicubically (``interpolate_pos_embed``). The official DINO
code interpolates with a scale factor plus a 0.1 offset, so features at non-native resolutions
differ very slightly from the reference implementation; at the native grid they are identical.

Parameter names are those of the official DINO / DINOv2 repositories (``cls_token``,
``pos_embed``, ``register_tokens``, ``mask_token``, ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``),
so their checkpoints load as an identity mapping (``labelwise.models.vit_loading``).

Attention kernel (``ViTConfig.attention_kernel``): ``"matmul"`` (default) computes
``softmax((q / sqrt(d)) k^T) v`` with explicit batched matmuls; ``"sdpa"`` calls
``F.scaled_dot_product_attention``. The attention maps of the requested blocks come from the
explicit path of that same forward (SDPA cannot return its weights), never from a second pass.

Measured on the project's 2-core AMX CPU with torch 2.13: batch 32, ``inference_mode``, same
weights, kernels interleaved, min of 2 runs after a warm-up; ms per batch (images/s)::

    forward, 2 threads     fp32                           bf16 autocast
    wall clock          matmul       sdpa      sdpa/mm   matmul       sdpa      sdpa/mm
    ViT-T/16  224 px    553 (58)     511 (63)    0.92    176 (182)    242 (132)   1.38
    ViT-T/16   96 px    137 (233)    138 (232)   1.01     51 (622)     55 (577)   1.08
    ViT-S/16  224 px   1916 (17)    2043 (16)    1.07    667 (48)     663 (48)    0.99
    ViT-S/16   96 px    287 (111)    291 (110)   1.01     85 (377)     91 (351)   1.07

Repeated while concurrent benchmarks saturated the machine, as CPU time of one thread
(``torch.set_num_threads(1)``, ``time.thread_time``; ~10% noise)::

    forward, 1 thread      fp32                      bf16 autocast
    CPU time            matmul   sdpa  sdpa/mm     matmul   sdpa  sdpa/mm
    ViT-T/16  224 px      1295   1067    0.82         355    455    1.28
    ViT-T/16   96 px       222    246    1.11          79     71    0.90
    ViT-S/16  224 px      3997   3667    0.92        1251   1336    1.07
    ViT-S/16   96 px       681    673    0.99         180    199    1.11

    attention op alone     fp32                      bf16 tensors
    q, k, v [32, h, N, 64]  matmul   sdpa  sdpa/mm     matmul   sdpa  sdpa/mm
    ViT-T  N = 197          15.8   13.6    0.86          6.6   14.7    2.22
    ViT-T  N =  37          0.73   0.93    1.27         0.37   1.04    2.78
    ViT-S  N = 197          36.4   28.3    0.78         13.8   29.8    2.17
    ViT-S  N =  37          1.83   2.08    1.13         0.70   2.29    3.25

In bf16 (the precision training uses on this CPU) SDPA is 2-3x slower per attention op and
up to 1.4x slower per forward, so ``"matmul"`` is the default; in fp32 neither wins
consistently (SDPA/matmul 0.82-1.11; SDPA tends to win at N = 197). The 5-20x
bf16 slowdown noted in DESIGN.md was not reproduced with torch 2.13 (2-3x per op here).
Attention (matmuls + softmax) is ~20% of a ViT-S/16 bf16 forward; the linear layers ~57%.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.errors import ConfigError
from labelwise.models.base import IMAGENET_MEAN, IMAGENET_STD, pad_to_multiple

#: (embed_dim, depth, num_heads) of the standard sizes (DeiT / DINO / DINOv2 naming).
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
#: ``arch`` value for a model whose ``embed_dim``, ``depth`` and ``num_heads`` are all given.
CUSTOM_ARCH = "custom"
ATTENTION_KERNELS = ("matmul", "sdpa")
LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ``VisionTransformer``; validated on construction (``ConfigError``).

    ``arch`` gives ``embed_dim``, ``depth`` and ``num_heads`` unless they are set explicitly;
    ``arch="custom"`` requires all three. ``resolved()`` returns the config with them filled
    in; ``dims`` is the ``(embed_dim, depth, num_heads)`` triple as ints.
    """

    arch: str = "vit_small"
    patch_size: int = 16
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_registers: int = 0
    layer_scale: float | None = None
    pos_grid: int = 14
    mask_token: bool = False
    drop_path: float = 0.0
    in_channels: int = 3
    attention_kernel: str = "matmul"

    def __post_init__(self) -> None:
        if self.arch != CUSTOM_ARCH and self.arch not in VIT_ARCHS:
            raise ConfigError(
                f"ViTConfig.arch: unknown architecture {self.arch!r}; "
                f"known: {', '.join([*VIT_ARCHS, CUSTOM_ARCH])}"
            )
        if self.arch == CUSTOM_ARCH and None in (self.embed_dim, self.depth, self.num_heads):
            raise ConfigError(
                "ViTConfig.arch: 'custom' needs embed_dim, depth and num_heads, got "
                f"{self.embed_dim!r}, {self.depth!r}, {self.num_heads!r}"
            )
        for name, minimum in (("patch_size", 1), ("pos_grid", 1), ("in_channels", 1),
                              ("num_registers", 0)):
            _check_int(name, getattr(self, name), minimum)
        for name in ("embed_dim", "depth", "num_heads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        dim, _, heads = self.dims
        if dim % heads:
            raise ConfigError(
                f"ViTConfig.embed_dim: {dim} is not divisible by num_heads = {heads}"
            )
        if not _is_number(self.mlp_ratio) or self.mlp_ratio <= 0 or int(dim * self.mlp_ratio) < 1:
            raise ConfigError(f"ViTConfig.mlp_ratio must be a number > 0, got {self.mlp_ratio!r}")
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"ViTConfig.qkv_bias must be a bool, got {self.qkv_bias!r}")
        if not isinstance(self.mask_token, bool):
            raise ConfigError(f"ViTConfig.mask_token must be a bool, got {self.mask_token!r}")
        if self.layer_scale is not None and (not _is_number(self.layer_scale) or self.layer_scale <= 0):
            raise ConfigError(
                f"ViTConfig.layer_scale must be None or a number > 0, got {self.layer_scale!r}"
            )
        if not _is_number(self.drop_path) or not 0 <= self.drop_path < 1:
            raise ConfigError(f"ViTConfig.drop_path must be in [0, 1), got {self.drop_path!r}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(
                f"ViTConfig.attention_kernel must be one of {list(ATTENTION_KERNELS)}, "
                f"got {self.attention_kernel!r}"
            )

    @property
    def dims(self) -> tuple[int, int, int]:
        """``(embed_dim, depth, num_heads)`` with the ``arch`` defaults filled in."""
        default = VIT_ARCHS.get(self.arch, (0, 0, 0))
        return (
            self.embed_dim if self.embed_dim is not None else default[0],
            self.depth if self.depth is not None else default[1],
            self.num_heads if self.num_heads is not None else default[2],
        )

    def resolved(self) -> ViTConfig:
        """This config with ``embed_dim``, ``depth`` and ``num_heads`` set to ints."""
        dim, depth, heads = self.dims
        return ViTConfig(**{**self.to_dict(), "embed_dim": dim, "depth": depth, "num_heads": heads})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``ViTConfig(**d)`` (or ``from_dict``) rebuilds the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        """``ViTConfig(**values)`` that names an unknown key in its ``ConfigError``."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"ViTConfig: unknown key {key!r}; known: {', '.join(sorted(known))}")
        return cls(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"ViTConfig.{name} must be an integer >= {minimum}, got {value!r}")


class ViTOutput(NamedTuple):
    """What ``VisionTransformer.forward`` returns (see the module docstring for shapes)."""

    cls_token: Tensor
    patch_tokens: Tensor
    attentions: dict[int, Tensor]
    register_tokens: Tensor | None


# ---------------------------------------------------------------------------------------------
# Building blocks


@torch.no_grad()
def trunc_normal_(tensor: Tensor, std: float = 0.02, bound: float = 2.0) -> Tensor:
    """DINO's ``trunc_normal_(std=std, a=-bound, b=bound)``: normal samples clamped to
    ``[-bound, bound]``. With DINO's absolute bounds +-2 and std 0.02 the bounds lie 100 std
    away, so clamping and resampling cannot differ; this is ~10x faster than
    ``nn.init.trunc_normal_`` (inverse-CDF sampling), which took ~1 s per ViT-T on 2 cores."""
    return tensor.normal_(0.0, std).clamp_(-bound, bound)


class PatchEmbed(nn.Module):
    """``[B, C, H, W]`` (H, W multiples of ``patch_size``) -> ``[B, D, H / p, W / p]``."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention ``[B, N, D] -> [B, N, D]`` (+ ``[B, heads, N, N]`` weights).

    ``kernel="matmul"``: explicit ``softmax((q / sqrt(d)) k^T) v``; ``"sdpa"``:
    ``F.scaled_dot_product_attention``, except when the weights are requested (SDPA does not
    return them), where the explicit path is used for that call.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, kernel: str = "matmul") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.kernel = kernel
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """``x [B, N, D]`` -> (``[B, N, D]``, softmax weights ``[B, heads, N, N]`` or None when
        not needed and SDPA ran)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, d]
        weights = None
        if self.kernel == "sdpa" and not need_weights:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = weights @ v
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), weights


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``: ``[..., D] -> [..., hidden] -> [..., D]``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel learnable scale ``x * gamma`` (CaiT / DINOv2), ``gamma [D]``."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random ``p`` of the samples
    and scale the kept ones by ``1 / (1 - p)``; identity in eval mode or when ``p == 0``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        layer_scale: float | None,
        drop_path: float,
        kernel: str,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, kernel=kernel)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        out, weights = self.attn(self.norm1(x), need_weights=need_weights)
        x = x + self.drop_path(self.ls1(out))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, weights


# ---------------------------------------------------------------------------------------------
# The model


class VisionTransformer(nn.Module):
    """ViT backbone: images ``[B, C, H, W]`` in [0, 1] -> ``ViTOutput`` (see module docstring).

    Attributes: ``config`` (the resolved ``ViTConfig``), ``embed_dim``, ``patch_size``,
    ``num_heads``, ``depth``, ``num_registers``, ``num_prefix_tokens`` (``1 + num_registers``).
    ``forward`` normalises (ImageNet mean/std) and pads; ``forward_tokens`` takes tensors that
    are already normalised and padded (what training methods and ``vit_linear`` use).
    """

    def __init__(self, config: ViTConfig | None = None) -> None:
        super().__init__()
        config = (config or ViTConfig()).resolved()
        dim, depth, heads = config.dims
        self.config = config
        self.embed_dim = dim
        self.depth = depth
        self.num_heads = heads
        self.patch_size = config.patch_size
        self.num_registers = config.num_registers
        self.num_prefix_tokens = 1 + config.num_registers
        self.pos_grid = config.pos_grid

        self.patch_embed = PatchEmbed(config.in_channels, dim, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_registers, dim)) if config.num_registers else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dim)) if config.mask_token else None
        rates = torch.linspace(0, config.drop_path, depth).tolist()  # deeper blocks drop more
        self.blocks = nn.ModuleList(
            Block(dim, heads, config.mlp_ratio, config.qkv_bias, config.layer_scale, rate,
                  config.attention_kernel)
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

        if config.in_channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean = (sum(IMAGENET_MEAN) / 3,) * config.in_channels
            std = (sum(IMAGENET_STD) / 3,) * config.in_channels
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DINO initialisation: truncated normal (std 0.02) for linear weights, ``pos_embed``
        and ``cls_token``; zero biases; LayerNorm (1, 0); registers ~N(0, 1e-6); mask token 0.
        The patch-embedding conv keeps PyTorch's default initialisation (as in DINO)."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- tokens ---------------------------------------------------------------------------
    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """Position embedding ``[1, 1 + h * w, D]`` for an ``h x w`` patch grid: the class
        position as stored, the patch grid resized bicubically from ``pos_grid x pos_grid``
        (``align_corners=False``). The stored parameter itself when ``h == w == pos_grid``."""
        grid = self.pos_grid
        if (h, w) == (grid, grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, grid, grid, self.embed_dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(h, w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def _attention_blocks(self, return_attention: Sequence[int]) -> set[int]:
        wanted = set()
        for index in return_attention:
            if isinstance(index, bool) or not isinstance(index, int) or not -self.depth <= index < self.depth:
                raise ValueError(
                    f"return_attention: block index {index!r} out of range for a ViT of depth {self.depth}"
                )
            wanted.add(index % self.depth)
        return wanted

    def forward_tokens(
        self, x: Tensor, masks: Tensor | None = None, return_attention: Sequence[int] = (),
        class_tokens: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Normalised, padded images ``x [B, C, H, W]`` (H, W multiples of ``patch_size``) ->
        (tokens ``[B, 1 + R + h * w, D]`` after the final norm, ``{block: [B, heads, N, N]}``).

        ``masks``: optional bool ``[B, h * w]``; True replaces that patch embedding by
        ``mask_token`` (before the position embedding is added, as iBOT / DINOv2).
        ``class_tokens``: optional ``[1 or B, K, D]`` tokens (their position embedding already
        added) that replace ``cls_token + pos_embed[:, :1]``: the output then starts with ``K``
        class tokens (the multi-class-token Transformer).
        """
        batch, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(
                f"forward_tokens expects H and W multiples of patch_size {p}, got {height}x{width} "
                "(use forward(), which pads, or pad_to_multiple)"
            )
        h, w = height // p, width // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, h*w, D]
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given but this ViT has no mask token (ViTConfig(mask_token=True))")
            if masks.shape != (batch, h * w) or masks.dtype != torch.bool:
                raise ValueError(
                    f"masks must be bool [B, h*w] = [{batch}, {h * w}], got {masks.dtype} {tuple(masks.shape)}"
                )
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        pos = self.interpolate_pos_embed(h, w)
        tokens = tokens + pos[:, 1:]
        first = self.cls_token + pos[:, :1] if class_tokens is None else class_tokens
        prefix = [first.expand(batch, -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(batch, -1, -1))
        tokens = torch.cat([*(t.to(tokens.dtype) for t in prefix), tokens], dim=1)

        wanted = self._attention_blocks(return_attention)
        attentions: dict[int, Tensor] = {}
        for index, block in enumerate(self.blocks):
            tokens, weights = block(tokens, need_weights=index in wanted)
            if index in wanted and weights is not None:
                attentions[index] = weights
        return self.norm(tokens), attentions

    def forward(
        self,
        images: Tensor,
        return_attention: Sequence[int] = (),
        masks: Tensor | None = None,
    ) -> ViTOutput:
        """``images [B, C, H, W]`` in [0, 1] (unnormalised) -> ``ViTOutput``.

        Pads bottom/right to a multiple of ``patch_size`` (reflect, or replicate when too
        small); ``return_attention`` lists the blocks whose attention maps to return (negative
        indices count from the end); ``masks`` as in ``forward_tokens``.
        """
        in_channels = self.config.in_channels
        if (
            not isinstance(images, Tensor)
            or images.dim() != 4
            or images.shape[1] != in_channels
            or images.numel() == 0
            or not images.is_floating_point()
        ):
            got = (
                f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            )
            raise ValueError(
                f"VisionTransformer expected float images [B, {in_channels}, H, W] in [0, 1], got {got}"
            )
        height, width = images.shape[-2:]
        x = pad_to_multiple((images - self.pixel_mean) / self.pixel_std, self.patch_size)
        tokens, attentions = self.forward_tokens(x, masks=masks, return_attention=return_attention)
        h, w = math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)
        start = self.num_prefix_tokens
        patches = tokens[:, start:].transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, h, w)
        registers = tokens[:, 1:start] if self.num_registers else None
        return ViTOutput(tokens[:, 0], patches, attentions, registers)


def create_vit(arch: str = "vit_small", patch_size: int = 16, **options: Any) -> VisionTransformer:
    """``VisionTransformer(ViTConfig(arch=arch, patch_size=patch_size, **options))``; an
    unknown option raises ``ConfigError`` naming it."""
    return VisionTransformer(ViTConfig.from_dict({"arch": arch, "patch_size": patch_size, **options}))
