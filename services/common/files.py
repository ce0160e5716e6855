"""Atomic file writes: a reader or a crash sees the old file or the new one, never a torn one.

Every file a service keeps across restarts (checkpoints, identity keys, the DHT's routing
state, host assignments, a trainer's history) is written the same way: into a temporary file
in the same directory (a rename is atomic only within one filesystem), flushed and fsynced,
renamed over the target, then the directory is fsynced so the rename itself survives a power
loss. On any failure the temporary file is removed and the old file is left as it was.

The price is two fsyncs per write (a disk's latency each); every writer here is periodic or
rare, so durability wins. Standard library only: ``deploy/tls/make_certs.py`` uses it too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(
    path: str | Path,
    data: bytes | str | Callable[[BinaryIO], object],
    *,
    mode: int = 0o666,
    replace: bool = True,
) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes into a binary file, such
    as ``lambda f: torch.save(state, f)``) to ``path`` atomically; missing parent directories
    are made.

    ``mode`` is the new file's permission, narrowed by the umask as ``open()`` does; the file
    has it from creation, so a key is never briefly readable by others. ``replace=False``
    never replaces an existing file, even one another process creates at the same moment: it
    raises ``FileExistsError`` instead (the temporary file is hard-linked, not renamed).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            if isinstance(data, str):
                file.write(data.encode())
            elif isinstance(data, bytes | bytearray | memoryview):
                file.write(data)
            else:
                data(file)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a rename
    fsync_directory(target.parent)
    return target


def fsync_directory(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where the filesystem does not
    let a directory be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
