"""Crash-safe file writes: write to a temporary file in the same folder, fsync, then rename."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from labelwise.errors import WriteError


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: The mode ``open(path, "w")`` would give a new file under this process's umask.
_FILE_MODE = _default_file_mode()

#: errno values of a write the operating system refused (not a bug in the code writing).
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write of the operating system (disk full, read-only folder,
    file-size limit...), as opposed to a bug in the code writing."""
    # safetensors reports its I/O errors as SafetensorError("... I/O error: ...")
    if type(exc).__name__ == "SafetensorError":
        return "I/O error" in str(exc)
    return isinstance(exc, OSError) and exc.errno in WRITE_FAILURES


def write_failure_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text.split("I/O error: ", 1)[1] if "I/O error: " in text else text


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A crash or exception leaves the previous ``path`` untouched and removes the temporary file.

    Raises:
        WriteError: the write failed in the operating system (disk full, read-only folder,
            file-size limit); the message names ``path`` and says the previous file is kept.
    """
    path = Path(path)
    existed = path.exists()
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp's files are private (0600); a plain write's are not
        os.replace(tmp, path)
    except Exception as exc:
        if not is_write_failure(exc):
            raise
        kept = "the previous version is kept" if existed else "nothing was written"
        raise WriteError(f"{path}: cannot write ({write_failure_reason(exc)}); {kept}. Free disk space or make "
                         "the folder writable, then run the command again (with --resume for training)") from exc
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
