"""What identifies a dataset without reading its pixels: its sample names, and its class, length
and plain public attributes (the feature cache's key, the labeled/unlabeled split lists)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

__all__ = ["dataset_identity", "dataset_names"]


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-able copy of small plain values (None when ``value`` is not plain)."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)) and len(value) <= 16 and depth < 2:
        items = [_plain(v, depth + 1) for v in value]
        return items if all(i is not None or v is None for i, v in zip(items, value)) else None
    return None


def _dataset_identity(dataset: Dataset) -> dict[str, Any]:
    custom = getattr(dataset, "cache_identity", None)
    if callable(custom):
        return {"custom": custom()}
    if isinstance(dataset, Subset):
        return {"subset_of": _dataset_identity(dataset.dataset)}
    identity: dict[str, Any] = {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
                                "length": len(dataset)}  # type: ignore[arg-type]
    for key, value in sorted(vars(dataset).items()):
        if key.startswith("_") or key == "names":
            continue
        plain = _plain(value)
        if plain is not None:
            identity[key] = plain
    return identity


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """What the cache key records of a dataset: its ``cache_identity()`` when it has one, else its
    class, length and plain public attributes (wrappers call this on the dataset they wrap)."""
    return _dataset_identity(dataset)


def dataset_names(dataset: Dataset) -> list[str]:
    """Sample names: ``dataset.names`` when it has them (a Subset maps its indices), otherwise
    read from every sample (one pass over the data, without the backbone)."""
    if isinstance(dataset, Subset):
        return [dataset_names(dataset.dataset)[i] for i in dataset.indices]
    names = getattr(dataset, "names", None)
    if isinstance(names, (list, tuple)) and len(names) == len(dataset):  # type: ignore[arg-type]
        return [str(n) for n in names]
    return [str(dataset[i].get("name", i)) for i in range(len(dataset))]  # type: ignore[arg-type]
