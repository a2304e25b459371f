"""Frozen-backbone features of whole datasets: extraction into a memory-mapped cache
(``cache``), its key (``key``), preprocessing (``preprocess``), the on-disk store (``store``)
and attention-map reductions (``attention``)."""

from labelwise.features.cache import (
    ATTENTION_KINDS,
    FeatureCache,
    FeatureDataset,
    default_cache_dir,
    extract_features,
    write_feature_cache,
)

__all__ = ["ATTENTION_KINDS", "FeatureCache", "FeatureDataset", "default_cache_dir", "extract_features",
           "write_feature_cache"]
