"""The three weak classifiers, built from a :class:`~labelwise.methods.weak.config.WeakConfig` and
rebuilt from their ``model.json`` architecture record.

- ``mct_vit``: :class:`~labelwise.models.mctformer.MultiClassTokenViT` on the ``backbone`` ViT
  (``hybrid: true``: its patch embedding replaced by a scratch convolutional stem);
- ``cnn_cam``: :class:`~labelwise.models.cnn_cam.CNNCAMClassifier` on the ``encoder`` with
  ``encoder_weights`` at ``encoder_output_stride``;
- ``hybrid``: the multi-class-token Transformer of ``backbone`` whose tokens are the pretrained
  ``encoder``'s last-stage features (:class:`~labelwise.models.mctformer.PretrainedCNNStem`, at the
  ViT's patch size), the seed documents' CNN + Transformer.
"""

from __future__ import annotations

from typing import Any, Mapping

from labelwise.errors import CheckpointError, ConfigError
from labelwise.methods.weak.cams import WeakClassifier
from labelwise.methods.weak.config import WeakConfig
from labelwise.models.cnn_cam import CNNCAMClassifier
from labelwise.models.encoders import skip_pretrained_weights
from labelwise.models.mctformer import MultiClassTokenViT, PretrainedCNNStem
from labelwise.models.vit import VisionTransformer, ViTConfig
from labelwise.models.vit_loading import load_vit

__all__ = ["build_classifier", "classifier_architecture", "classifier_from_architecture"]


def _stem(vit: VisionTransformer, encoder: str, weights: str | None) -> PretrainedCNNStem:
    return PretrainedCNNStem(vit.embed_dim, vit.patch_size, vit.pixel_mean.flatten().tolist(),
                             vit.pixel_std.flatten().tolist(), encoder, weights)


def build_classifier(config: WeakConfig, num_classes: int) -> WeakClassifier:
    """The configured classifier with its pretrained weights (ConfigError on a bad combination)."""
    if config.method == "cnn_cam":
        return CNNCAMClassifier(num_classes, config.encoder, config.encoder_weights, config.encoder_output_stride)
    vit = load_vit(config.backbone)
    config.cams.validate(vit.depth)  # fail now, not after training, when cams.blocks exceeds the depth
    if any(s % vit.patch_size for s in config.image_size):
        raise ConfigError(f"image_size: {config.image_size} must be multiples of the patch size {vit.patch_size}")
    if config.method == "hybrid":  # WeakConfig.validate refuses hybrid: true with it
        return MultiClassTokenViT(vit, num_classes, config.variant, readout=config.readout,
                                  stem=_stem(vit, config.encoder, config.encoder_weights))
    return MultiClassTokenViT(vit, num_classes, config.variant, hybrid=config.hybrid, readout=config.readout)


def classifier_architecture(model: WeakClassifier) -> dict[str, Any]:
    """The ``architecture`` record of ``model.json`` (what :func:`classifier_from_architecture` reads)."""
    if isinstance(model, CNNCAMClassifier):
        return model.architecture()
    stem = model.stem_description()
    return {"type": "hybrid" if stem else "mct_vit", "vit": model.backbone.config.to_dict(),
            "num_classes": model.num_classes, "variant": model.variant, "hybrid": model.hybrid,
            "readout": model.readout, **({"stem": stem} if stem else {})}


def classifier_from_architecture(summary: Mapping[str, Any], where: str) -> WeakClassifier:
    """The architecture of a ``model.json`` record with random weights (its own replace them);
    records without ``type`` are ``mct_vit``. ``CheckpointError`` naming ``where`` otherwise."""
    kind = summary.get("type", "mct_vit")
    try:
        with skip_pretrained_weights():
            if kind == "cnn_cam":
                return CNNCAMClassifier(int(summary["num_classes"]), summary["encoder"], summary.get("weights"),
                                        int(summary["output_stride"]))
            vit = VisionTransformer(ViTConfig.from_dict(summary["vit"]))
            if kind == "hybrid":
                stem = summary["stem"]
                return MultiClassTokenViT(vit, int(summary["num_classes"]), summary["variant"],
                                          readout=summary.get("readout", "mean"),
                                          stem=_stem(vit, stem["encoder"], stem.get("weights")))
            if kind != "mct_vit":
                raise CheckpointError(f"{where}: unknown classifier type {kind!r} (mct_vit, cnn_cam or hybrid)")
            return MultiClassTokenViT(vit, int(summary["num_classes"]), summary["variant"],
                                      bool(summary.get("hybrid")), summary.get("readout", "mean"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: classifier description lacks or mangles {exc}") from exc
