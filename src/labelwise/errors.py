"""Exceptions raised for bad user input. Every message names the file or key at fault."""

from __future__ import annotations


class LabelwiseError(Exception):
    """Base class of every error labelwise raises on purpose."""


class DataError(LabelwiseError):
    """A dataset file is missing, unreadable, inconsistent or holds an invalid label."""


class ConfigError(LabelwiseError):
    """A configuration key is unknown, mistyped or out of range."""


class CheckpointError(LabelwiseError):
    """A checkpoint is missing, truncated or does not match the model."""


class WriteError(LabelwiseError):
    """A file could not be written (disk full, read-only folder, file-size limit); the previous
    version of the file is intact."""
