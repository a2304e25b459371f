"""Segmentation models and their registry.

    from labelwise.models import create
    model = create("unet", num_classes=5, width=16, depth=3)
    logits = model(images)                    # [B, 3, H, W] in [0, 1] -> [B, 5, H, W]
    same = create(**model.config())           # rebuild from a saved JSON config

Registered names: ``"unet"`` (plain, or on a pretrained encoder with ``encoder="mobilenet_v2"``),
``"deeplabv3plus"`` (ASPP + low-level skip on a pretrained encoder), ``"u2net"`` (variant "full"),
``"u2net_small"`` (U²-Net†), ``"vit_linear"`` (ViT backbone + linear / small conv head,
``models/vit_seg.py``).

    model = create("unet", num_classes=11, encoder="mobilenet_v2", encoder_weights="imagenet")
    model.freeze_encoder_bn()                 # keep BatchNorm statistics (small batches)
New models register with ``@register_model("name")`` on a ``SegmentationModel`` subclass; the
module defining them must be imported here.
"""

from labelwise.models.base import (
    DeepSupervisionOutput,
    ModelOutput,
    SegmentationModel,
    available_models,
    create,
    model_options,
    register_model,
)
from labelwise.models.deeplabv3plus import DeepLabV3Plus
from labelwise.models.encoders import ENCODERS, build_encoder, skip_pretrained_weights
from labelwise.models.heads import PixelClassifier
from labelwise.models.mobilenet_v2 import MobileNetV2, MobileNetV2Encoder
from labelwise.models.u2net import RSU, U2Net
from labelwise.models.unet import UNet
from labelwise.models.unet_encoder import EncoderUNet
from labelwise.models.unet_select import unet
from labelwise.models.vit import VIT_ARCHS, VisionTransformer, ViTConfig, ViTOutput, create_vit
from labelwise.models.vit_seg import ViTSegmenter
from labelwise.models.wide_context import ContextOutput, WideContextSegmenter

__all__ = [
    "ENCODERS",
    "RSU",
    "DeepLabV3Plus",
    "EncoderUNet",
    "MobileNetV2",
    "MobileNetV2Encoder",
    "build_encoder",
    "skip_pretrained_weights",
    "unet",
    "DeepSupervisionOutput",
    "ModelOutput",
    "PixelClassifier",
    "SegmentationModel",
    "U2Net",
    "UNet",
    "VIT_ARCHS",
    "ViTConfig",
    "ViTOutput",
    "ViTSegmenter",
    "WideContextSegmenter",
    "ContextOutput",
    "VisionTransformer",
    "available_models",
    "create",
    "create_vit",
    "model_options",
    "register_model",
]
