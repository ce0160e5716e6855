"""Atomic checkpoints of a trainer's own state (its local parameters and optimizer).

The experts' weights live on their servers, which checkpoint them themselves; a trainer saves
the gating functions and the other local layers, its optimizer, its step and sample counters
and its evaluation history. Written to a temporary file in the same directory, flushed to
disk, then renamed over the previous one, so a crash at any point leaves either the old or
the new checkpoint, never a torn one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FILENAME = "trainer.pt"


def save(directory: str | Path, state: dict[str, Any]) -> Path:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / FILENAME
    tmp = root / f".{FILENAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    try:
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every filesystem lets a directory be fsynced
        pass
    return final


def finite(state: Any) -> bool:
    """Every floating tensor in ``state`` (nested dicts, lists, tuples) holds finite values."""
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(finite(v) for v in state.values())
    if isinstance(state, list | tuple):
        return all(finite(v) for v in state)
    return True


def load(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
