"""An unsupervised segmenter as one module: frozen ViT -> code head -> cosine scores to the
cluster centroids, upsampled to the image.

``ClusterSegmenter(images [B, 3, H, W] in [0, 1]) -> scores [B, K, H, W]`` (cosine similarity
of each pixel's unit code to each of the ``K`` unit centroids, bilinearly upsampled from the
patch grid), so the one sliding-window inference and evaluation of :mod:`labelwise.predict`
serve it like a supervised model; ``argmax`` over ``K`` is the cluster id.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from labelwise.models.heads import ProjectionHead
from labelwise.models.vit import VisionTransformer, ViTConfig

__all__ = ["ClusterSegmenter"]


class ClusterSegmenter(nn.Module):
    """Backbone + code head + centroids.

    Args:
        backbone: the frozen ViT the head was trained on (it normalises its own input).
        centroids: ``[K, dim]`` cluster centres (normalised to unit rows here).
        head: ``features [B, D, h, w] -> codes [B, dim, h, w]``; ``None`` for k-means on the
            backbone features themselves (``dim = D``).
    """

    def __init__(self, backbone: VisionTransformer, centroids: Tensor, head: ProjectionHead | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("centroids", F.normalize(centroids.detach().float(), dim=1))
        for param in self.parameters():
            param.requires_grad_(False)

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def codes(self, features: Tensor) -> Tensor:
        """Unit codes ``[B, dim, h, w]`` of backbone features ``[B, D, h, w]`` (float32)."""
        features = features.float()
        return F.normalize(self.head(features) if self.head is not None else features, dim=1)

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        features = self.backbone(images).patch_tokens
        with torch.autocast(device_type=images.device.type, enabled=False):
            scores = torch.einsum("bchw,kc->bkhw", self.codes(features), self.centroids)
            # the patch grid covers the image padded to a multiple of the patch size (bottom/right)
            stride = self.backbone.patch_size
            h, w = scores.shape[-2:]
            scores = F.interpolate(scores, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
        return scores[..., :height, :width]

    def config(self) -> dict[str, Any]:
        """What :meth:`from_config` needs to rebuild the architecture (weights excluded)."""
        return {"vit": self.backbone.config.to_dict(), "clusters": self.num_clusters,
                "head": None if self.head is None else {"in_channels": self.head.in_channels, "dim": self.head.dim}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClusterSegmenter:
        backbone = VisionTransformer(ViTConfig.from_dict(config["vit"]))
        head_config = config.get("head")
        head = None if head_config is None else ProjectionHead(int(head_config["in_channels"]), int(head_config["dim"]))
        dim = backbone.embed_dim if head is None else int(head_config["dim"])
        return cls(backbone.eval(), torch.zeros(int(config["clusters"]), dim), head).eval()
