"""Checkpoint files: atomic writes, random-generator states, and the detector file format.

Two files come out of a training run:
    checkpoint.pt  everything a resumed run needs to continue exactly: step, student and adapter
                   weights, optimizer, scheduler, grad scaler, and every process's RNG states
    model.pt       the trained detector alone (weights, config, categories): a teacher or `ssimkd eval`
Both load with torch.load(weights_only=True): RNG states are stored as tensors and plain tuples, so
no pickled Python objects are needed.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import Config, to_dict


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file next to path, then os.replace: a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_detector(path, model: nn.Module, config: Config, categories: list[dict], **extra) -> None:
    """Write model.pt: the detector's weights, the config that built it and the dataset's categories."""
    atomic_save({"model": model.state_dict(), "config": to_dict(config), "categories": categories, **extra}, path)


def capture_rng() -> dict:
    """This process's torch, CUDA, numpy and Python RNG states, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Undo capture_rng: set every generator back to the saved state."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
