"""Reading safetensors files with one error per problem that names the file.

safetensors checks the header and the sizes, but not the bytes of the tensors: a flipped bit in
the data loads silently. Files labelwise writes therefore have their SHA-256 recorded beside
them (checkpoint ``state.json``, ``model.json``) and :func:`read_safetensors` verifies it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from labelwise.errors import CheckpointError

__all__ = ["file_sha256", "read_safetensors"]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: str | Path, what: str = "weights file", sha256: str | None = None) -> dict[str, Tensor]:
    """Every tensor of the safetensors file ``path`` (on the CPU).

    Args:
        sha256: the digest recorded when the file was written; when given, a file whose bytes
            differ (a flipped bit, a partial copy) is refused.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or fails its checksum; the
            message names ``path`` and says what the file is (``what``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} is missing")
    if sha256 is not None:
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable {what} ({exc.strerror})") from exc
        if actual != sha256:
            raise CheckpointError(f"{path}: {what} is corrupt: its SHA-256 {actual[:12]}... differs from the "
                                  f"{sha256[:12]}... recorded when it was written")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {what} is truncated or corrupt ({exc})") from exc
