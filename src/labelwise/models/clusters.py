"""An unsupervised segmenter as one module: frozen backbone (a ViT, a CNN or both,
:mod:`labelwise.models.feature_backbones`) -> code head -> cosine scores to the
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

from labelwise.features.attention import patch_tokens
from labelwise.models.feature_backbones import feature_backbone_config, feature_backbone_from_config, is_vit
from labelwise.models.heads import ProjectionHead
from labelwise.models.vit import VisionTransformer, ViTConfig

__all__ = ["ClusterSegmenter"]


class ClusterSegmenter(nn.Module):
    """Backbone + code head + centroids.

    Args:
        backbone: the frozen feature backbone the head was trained on (it normalises its own
            input; ``patch_size`` is its stride).
        centroids: ``[K, dim]`` cluster centres (normalised to unit rows here).
        head: ``features [B, D, h, w] -> codes [B, dim, h, w]``; ``None`` for clustering the
            backbone features themselves (``dim = D``: k-means, PriMaPs).
        feature_center: ``[D]`` subtracted from the features before anything else (PriMaPs
            clusters features centred by the training set's mean); None: no centring.
    """

    def __init__(self, backbone: nn.Module, centroids: Tensor, head: ProjectionHead | None = None,
                 feature_center: Tensor | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("centroids", F.normalize(centroids.detach().float(), dim=1))
        self.feature_center: Tensor | None
        if feature_center is not None:
            self.register_buffer("feature_center", feature_center.detach().float().reshape(1, -1, 1, 1))
        else:
            self.feature_center = None
        for param in self.parameters():
            param.requires_grad_(False)

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def codes(self, features: Tensor) -> Tensor:
        """Unit codes ``[B, dim, h, w]`` of backbone features ``[B, D, h, w]`` (float32)."""
        features = features.float()
        if self.feature_center is not None:
            features = features - self.feature_center.to(features.device)
        return F.normalize(self.head(features) if self.head is not None else features, dim=1)

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        features = patch_tokens(self.backbone(images))
        with torch.autocast(device_type=images.device.type, enabled=False):
            scores = torch.einsum("bchw,kc->bkhw", self.codes(features), self.centroids)
            # the patch grid covers the image padded to a multiple of the patch size (bottom/right)
            stride = self.backbone.patch_size
            h, w = scores.shape[-2:]
            scores = F.interpolate(scores, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
        return scores[..., :height, :width]

    def config(self) -> dict[str, Any]:
        """What :meth:`from_config` needs to rebuild the architecture (weights excluded)."""
        # a ViT keeps the "vit" key of the first exports; other backbones describe themselves
        described = ({"vit": self.backbone.config.to_dict()} if is_vit(self.backbone)  # type: ignore[operator]
                     else {"backbone": feature_backbone_config(self.backbone)})
        return {**described, "clusters": self.num_clusters,
                "head": None if self.head is None else {"in_channels": self.head.in_channels, "dim": self.head.dim},
                **({"feature_center": True} if self.feature_center is not None else {})}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClusterSegmenter:
        backbone = (VisionTransformer(ViTConfig.from_dict(config["vit"])) if "vit" in config
                    else feature_backbone_from_config(config["backbone"]))
        head_config = config.get("head")
        head = None if head_config is None else ProjectionHead(int(head_config["in_channels"]), int(head_config["dim"]))
        dim = int(backbone.embed_dim) if head is None else int(head_config["dim"])
        center = torch.zeros(int(backbone.embed_dim)) if config.get("feature_center") else None
        return cls(backbone.eval(), torch.zeros(int(config["clusters"]), dim), head, center).eval()
