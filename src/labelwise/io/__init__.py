"""Files on disk: crash-safe writes (``atomic``), JSON with project errors (``jsonfile``), and the
formats of training checkpoints and exported weights (``checkpoint``)."""

from labelwise.io.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from labelwise.io.jsonfile import read_json

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json"]
