"""Checkpoints: each expert's weights, optimizer state and step count, written atomically.

Layout: ``<dir>/<uid>/<steps:012d>-<unix_ms>.pt``. A write goes to a temporary file in the same
directory, is fsynced, then renamed (``services.common.files``), so a crash mid-write leaves the
previous checkpoint intact. The newest ``keep`` files per expert survive. On start
the newest readable file is restored (an unreadable one is skipped with a warning, so one
damaged file does not lose all progress).

The expert's lock is held only to copy its state into host memory (a memory copy), not through
``torch.save`` and ``fsync`` (a disk's latency, unbounded on a slow one), so checkpoints do not
stall compute; the price is one transient copy of one expert's state at a time. The copy holds
CPU tensors, so a GPU server's checkpoint loads anywhere without ``map_location``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from services.common.files import atomic_write
from services.expert.backend import ExpertBackend

log = logging.getLogger(__name__)


def expert_dir(root: Path, uid: str) -> Path:
    return root / uid


def list_checkpoints(root: Path, uid: str) -> list[Path]:
    """Checkpoint files of ``uid``, oldest first."""
    folder = expert_dir(root, uid)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.pt") if not p.name.startswith("."))


def save(state: dict[str, Any], root: Path, keep: int) -> Path:
    """Write ``state`` (an expert's :meth:`~ExpertBackend.snapshot_state`) and prune old files."""
    uid, steps = state["uid"], int(state["steps"])
    name = f"{steps:012d}-{int(time.time() * 1000):013d}.pt"
    target = atomic_write(
        expert_dir(root, uid) / name, lambda file: torch.save(state, file), mode=0o600
    )
    for old in list_checkpoints(root, uid)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return target


def load_latest(backend: ExpertBackend, root: Path) -> Path | None:
    """Restore the newest readable checkpoint of ``backend``; None when there is none."""
    for path in reversed(list_checkpoints(root, backend.uid)):
        try:
            state: dict[str, Any] = torch.load(path, map_location=backend.device, weights_only=True)
            backend.load_state_dict(state)
        except Exception as exc:
            log.warning(
                "skipping unreadable checkpoint",
                extra={"expert": backend.uid, "path": str(path), "error": repr(exc)},
            )
            continue
        log.info(
            "restored checkpoint",
            extra={"expert": backend.uid, "path": str(path), "steps": backend.steps},
        )
        return path
    return None


class Checkpointer:
    """Saves every expert that changed since its last save; used periodically and on stop."""

    def __init__(self, backends: list[ExpertBackend], root: Path, keep: int) -> None:
        self.backends = backends
        self.root = root
        self.keep = keep
        self.saved_steps: dict[str, int] = {}
        self.saved_at: dict[str, float] = {}
        self._writing = threading.Lock()  # one save_all at a time (periodic and on stop)

    def restore(self) -> None:
        for backend in self.backends:
            path = load_latest(backend, self.root)
            if path is not None:
                self.saved_steps[backend.uid] = backend.steps
                self.saved_at[backend.uid] = path.stat().st_mtime

    def save_all(self, force: bool = False) -> tuple[int, int]:
        """Blocking (run it in a thread). Returns (written, failed)."""
        written = failed = 0
        with self._writing:
            for backend in self.backends:
                with backend.lock:  # only to copy: compute goes on while the copy is written
                    steps = backend.steps
                    if not force and self.saved_steps.get(backend.uid) == steps:
                        self.saved_at[backend.uid] = time.time()  # nothing new: still current
                        continue
                    state = backend.snapshot_state()
                try:
                    save(state, self.root, self.keep)
                except Exception:
                    failed += 1
                    log.exception("checkpoint failed", extra={"expert": backend.uid})
                    continue
                finally:
                    del state
                self.saved_steps[backend.uid] = steps
                self.saved_at[backend.uid] = time.time()
                written += 1
        return written, failed
