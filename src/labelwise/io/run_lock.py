"""One writer per run folder: an advisory lock file that names its holder.

``RUN_DIR/.labelwise.lock`` is locked with ``fcntl.flock`` for as long as a command writes into
the folder, and holds the holder's pid, host, command and start time as JSON. The kernel drops
the lock when its process dies, however it dies, so a stale lock (a killed run) is simply
taken over; its JSON is then reported as the previous holder. A second process asking for the
lock of a folder in use gets :class:`RunFolderBusy` naming the holder.

The lock is re-entrant within a process (a weak run that trains its segmenter in a sub-folder
takes that folder's own lock; a step that re-enters its own folder counts up). Only rank 0 of a
distributed run takes it (``RANK`` unset or 0): the ranks of one run share the folder. Where
``fcntl`` does not exist (Windows) no lock is taken.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from labelwise.errors import CheckpointError, LabelwiseError
from labelwise.io.checkpoint import has_checkpoint

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".labelwise.lock"

#: resolved folder -> (open lock file descriptor, nesting depth) of the locks this process holds
_HELD: dict[Path, list[int]] = {}


class RunFolderBusy(LabelwiseError):
    """Another live process holds the run folder's lock."""


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "another process (no holder recorded)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command', '?')}, since {since})"


def read_holder(run_dir: str | Path) -> dict[str, Any]:
    """The holder record in ``run_dir``'s lock file ({} when absent, empty or unreadable)."""
    try:
        text = (Path(run_dir) / LOCK_NAME).read_text()
        info = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


@contextmanager
def run_folder_lock(run_dir: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the folder) for the ``with`` block.

    Raises:
        RunFolderBusy: a live process holds it; the message names that process.
    """
    if fcntl is None or not _is_rank_zero():
        yield
        return
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunFolderBusy(f"{folder}: the run folder is in use by {_holder_text(read_holder(folder))}; wait "
                            "for it to finish, stop it, or choose another --run-dir") from None
    previous = read_holder(folder)
    if previous and previous.get("pid") != os.getpid():
        warnings.warn(f"{folder}: took over the lock of {_holder_text(previous)}, which is no longer running",
                      stacklevel=3)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if command is None else command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        try:
            os.ftruncate(fd, 0)  # released cleanly: no holder to report
        finally:
            os.close(fd)  # closing drops the flock


@contextmanager
def open_run_folder(run_dir: str | Path, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``run_dir``'s lock and, before anything is written, refuse a folder that holds
    another run's checkpoints unless ``resume`` or ``overwrite`` says what to do with them.

    Raises:
        RunFolderBusy: another live process writes into ``run_dir``.
        CheckpointError: ``run_dir`` holds checkpoints and neither flag is set.
    """
    with run_folder_lock(run_dir):
        if not resume and not overwrite and has_checkpoint(run_dir):
            raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
                                  "--overwrite to start again, or choose another --run-dir")
        yield


F = TypeVar("F", bound=Callable[..., Any])


def locks_run_folder(train: F) -> F:
    """Decorate a regime's ``train(config, resume=False, overwrite=False, ...)`` to run inside
    :func:`open_run_folder` of ``config.run_dir``."""

    @functools.wraps(train)
    def locked(config: Any, *args: Any, **kwargs: Any) -> Any:
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()  # a bad config is reported before anything about the folder
        resume = bool(args[0] if args else kwargs.get("resume", False))
        overwrite = bool(args[1] if len(args) > 1 else kwargs.get("overwrite", False))
        with open_run_folder(config.run_dir, resume=resume, overwrite=overwrite):
            return train(config, *args, **kwargs)

    return locked  # type: ignore[return-value]
