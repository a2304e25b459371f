"""Reading safetensors files with one error per problem that names the file."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from labelwise.errors import CheckpointError

__all__ = ["read_safetensors"]


def read_safetensors(path: str | Path, what: str = "weights file") -> dict[str, Tensor]:
    """Every tensor of the safetensors file ``path`` (on the CPU).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt; the message names ``path``
            and says what the file is (``what``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: {what} is truncated or corrupt ({exc})") from exc
