"""labelwise: semantic segmentation when pixel labels are scarce or absent.

``labelwise.load(folder)`` loads any trained model folder for inference (see
:mod:`labelwise.inference`); the regimes live in :mod:`labelwise.methods`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    # imported on first use, so that `import labelwise` (the CLI's parser) does not import torch
    if name == "load":
        from labelwise.inference import load

        return load
    raise AttributeError(f"module 'labelwise' has no attribute {name!r}")
