"""Device, precision and distributed (torchrun) set-up shared by every training regime."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
from dataclasses import dataclass
from typing import ContextManager

import numpy as np
import torch
import torch.distributed as dist

from labelwise.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available else CPU; ``cuda`` without a GPU is an error.

    Under torchrun each rank takes the GPU of its ``LOCAL_RANK``.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA GPU is available (use --device auto or cpu)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def autocast(device: torch.device, precision: str) -> ContextManager:
    """bf16 autocast on CPU or GPU when ``precision == "bf16"``; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ConfigError(f"precision: expected bf16 or fp32, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on
    GPU); returns rank 0 of 1 when the process was not started by torchrun. The group lasts
    for the process (every trainer of a pipeline shares it) and is destroyed at exit."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        # left to interpreter teardown, the backend's threads were sometimes destroyed while
        # joinable: "terminate called without an active exception", SIGABRT after a finished run
        atexit.register(_destroy_process_group)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
