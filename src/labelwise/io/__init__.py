"""Files on disk: crash-safe writes (``atomic``), JSON and safetensors reading with errors that
name the file (``jsonfile``, ``tensors``), and the training-checkpoint format (``checkpoint``)."""

from labelwise.io.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from labelwise.io.jsonfile import read_json
from labelwise.io.tensors import read_safetensors

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json", "read_safetensors"]
