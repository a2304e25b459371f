"""Labeled / unlabeled subsets of a labeled dataset, for semi-supervised runs.

:func:`split_labeled` picks the labeled part deterministically from the sample names, a seed and
a fraction or count: the names are sorted, shuffled by ``numpy.random.default_rng(seed)``, and the
first ``n`` become labeled (``n = round(fraction * N)``, at least 1). Because every size takes a
prefix of the same shuffled order, the splits of one seed are nested: the 1/16 subset is part of
the 1/8 subset, which is part of the 1/4 subset.

Splits are written as plain list files, one sample name per line (``#`` starts a comment), so a
run can be reproduced from the files alone: :func:`write_name_list` (atomic) and
:func:`read_name_list`, which checks the names against the samples that exist and names the file
and line of any problem (unknown name, duplicate, empty list).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from labelwise.data.identity import dataset_names
from labelwise.errors import ConfigError, DataError
from labelwise.io.atomic import atomic_write_text

__all__ = ["LabeledSplit", "NamedSubset", "dataset_names", "read_name_list", "split_labeled", "write_name_list",
           "write_split"]

LABELED_FILE = "labeled.txt"
UNLABELED_FILE = "unlabeled.txt"


@dataclass(frozen=True)
class LabeledSplit:
    """Disjoint ``labeled`` and ``unlabeled`` sample names (each sorted) and how they were drawn."""

    labeled: list[str]
    unlabeled: list[str]
    seed: int
    fraction: float

    def describe(self) -> str:
        total = len(self.labeled) + len(self.unlabeled)
        return f"{len(self.labeled)} of {total} labeled (fraction {self.fraction:.6g}, seed {self.seed})"


def split_labeled(names: Sequence[str], fraction: float | None = None, count: int | None = None,
                  seed: int = 0) -> LabeledSplit:
    """Split ``names`` into labeled and unlabeled parts (module docstring); give exactly one of
    ``fraction`` (in (0, 1]) and ``count`` (in [1, N])."""
    unique = sorted(set(names))
    if len(unique) != len(names):
        raise DataError("split_labeled: sample names must be unique")
    if not unique:
        raise DataError("split_labeled: no samples to split")
    if (fraction is None) == (count is None):
        raise ConfigError("give exactly one of fraction and count")
    total = len(unique)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"fraction: must be in (0, 1], got {fraction}")
        n = max(1, math.floor(fraction * total + 0.5))
    else:
        assert count is not None
        if not 1 <= count <= total:
            raise ConfigError(f"count: must be in [1, {total}], got {count}")
        n = count
    order = np.random.default_rng(seed).permutation(total)
    chosen = set(order[:n].tolist())
    labeled = [name for i, name in enumerate(unique) if i in chosen]
    unlabeled = [name for i, name in enumerate(unique) if i not in chosen]
    return LabeledSplit(labeled, unlabeled, seed, n / total)


def write_name_list(path: str | Path, names: Sequence[str], comment: str = "") -> Path:
    """Write ``names`` one per line (after ``# comment`` lines) atomically; returns the path."""
    lines = [f"# {line}" for line in comment.splitlines() if line] + list(names)
    bad = [n for n in names if not n or n != n.strip() or "\n" in n or n.startswith("#")]
    if bad:
        raise DataError(f"{path}: names that a list file cannot hold: {bad[:3]}")
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)


def write_split(folder: str | Path, split: LabeledSplit) -> tuple[Path, Path]:
    """``folder/labeled.txt`` and ``folder/unlabeled.txt`` of ``split``."""
    folder = Path(folder)
    header = f"labelwise split: {split.describe()}"
    return (write_name_list(folder / LABELED_FILE, split.labeled, f"{header}\nlabeled samples"),
            write_name_list(folder / UNLABELED_FILE, split.unlabeled, f"{header}\nunlabeled samples"))


def read_name_list(path: str | Path, available: Sequence[str] | None = None) -> list[str]:
    """Names listed in ``path`` in file order. With ``available``, every name must be one of them.
    ``DataError`` naming the file (and line) for a missing file, an empty list, a duplicate or an
    unknown name."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: list file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable list file: {exc}") from exc
    known = set(available) if available is not None else None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name or name.startswith("#"):
            continue
        if name in first_line:
            raise DataError(f"{path}:{number}: {name!r} is listed twice (first on line {first_line[name]})")
        if known is not None and name not in known:
            raise DataError(f"{path}:{number}: {name!r} is not a sample of the dataset")
        first_line[name] = number
        names.append(name)
    if not names:
        raise DataError(f"{path}: the list names no samples")
    return names


class NamedSubset(Dataset):
    """The samples of ``source`` named in ``names`` (in that order). Keeps the source's
    ``class_map``; ``names`` lists the subset's names; ``set_epoch`` is forwarded.
    ``DataError`` names ``origin`` (e.g. the list file) for a name the source does not have."""

    def __init__(self, source: Dataset, names: Sequence[str], origin: str = "the name list") -> None:
        index = {name: i for i, name in enumerate(dataset_names(source))}
        missing = [n for n in names if n not in index]
        if missing:
            raise DataError(f"{origin}: {len(missing)} name(s) are not samples of the dataset: {missing[:5]}")
        self.source = source
        self.names = list(names)
        self.indices = [index[n] for n in names]
        self.class_map = getattr(source, "class_map", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        return self.source[self.indices[index]]

    def set_epoch(self, epoch: int) -> None:
        setter = getattr(self.source, "set_epoch", None)
        if setter is not None:
            setter(epoch)
