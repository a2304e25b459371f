"""Reading the JSON files labelwise writes (model descriptions, checkpoint states, manifests),
with one error per problem that names the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from labelwise.errors import CheckpointError, LabelwiseError

__all__ = ["read_json"]


def read_json(path: str | Path, what: str, error: type[LabelwiseError] = CheckpointError,
              missing: str | None = None) -> Any:
    """The parsed content of the JSON file ``path``.

    Args:
        path: the file.
        what: what the file is, for the messages (e.g. ``"checkpoint state"``).
        error: the project error raised (``CheckpointError`` for run and model files,
            ``DataError`` for data files).
        missing: the message after ``"<path>: "`` when the file does not exist (default:
            ``"<what> is missing"``), e.g. to say what the folder is expected to be.

    Raises:
        ``error``: the file is missing, unreadable, or not valid JSON; the message names ``path``.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{path}: {missing or f'{what} is missing'}") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{path}: corrupt {what}: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable {what}: {exc}") from exc
