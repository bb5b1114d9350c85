"""Where a training or evaluation process runs: its device, its rank in torchrun's process group, and the
autocast dtype; shared by train.py, evaluate.py and demo.py."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Runtime", "resolve_device", "init_runtime", "amp_dtype"]


@dataclass
class Runtime:
    """Where this process runs: device, rank and world size (1 without torchrun)."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_runtime(device_name: str) -> Runtime:
    """The Runtime of this process; joins the process group when started by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size == 1:
        return Runtime(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank(), local_rank, dist.get_world_size())


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.amp on this device; None (full precision) on the CPU."""
    if amp == "off":
        return None
    if device.type != "cuda":
        if amp != "auto":
            warnings.warn(f"train.amp = {amp!r} is for GPUs; training on the CPU in float32", stacklevel=2)
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
