"""Which uids this host chose, kept on the checkpoint volume so a restart hosts the same ones.

With ``--num-experts N`` a server picks N uids at random among those not declared in the DHT.
A restarted container would otherwise pick *new* uids (its old declarations have not expired
yet, so its own experts look taken) and leave its checkpoints orphaned. The choice is written
to ``<checkpoint-dir>/hosts/<hostname>.json``: replicas sharing one volume each have their own
file (container hostnames differ), and a container restarted under the same hostname reads
its list back. The trade-off: a container recreated under a new hostname starts a new list
(its old experts expire from the DHT and are free for anyone to pick up again, checkpoints
included). A file that does not fit the current flags (other pattern, other count, bad json)
is ignored with a warning and replaced.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from pathlib import Path

from services.common.files import atomic_write
from services.expert import uid as uids

log = logging.getLogger(__name__)

HOSTS_DIR = "hosts"  # uids always contain a dot, so no expert's checkpoint folder is named so


def _host(hostname: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", hostname or socket.gethostname()) or "host"


def assignment_path(checkpoint_dir: Path, hostname: str | None = None) -> Path:
    return checkpoint_dir / HOSTS_DIR / f"{_host(hostname)}.json"


def identity_path(checkpoint_dir: Path, hostname: str | None = None) -> Path:
    """The host's identity key beside its assignment: a restarted container keeps owning the
    DHT declarations of the experts it keeps hosting."""
    return checkpoint_dir / HOSTS_DIR / f"{_host(hostname)}.key"


def load(path: Path, patterns: list[str], count: int) -> list[str] | None:
    """The uids recorded in ``path`` if they still fit ``patterns`` and ``count``."""
    if not path.exists():
        return None
    try:
        chosen = json.loads(path.read_text())["uids"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning(
            "ignoring unreadable host assignment", extra={"path": str(path), "error": str(exc)}
        )
        return None
    if (
        not isinstance(chosen, list)
        or len(chosen) != count
        or len(set(chosen)) != count
        or not all(isinstance(u, str) and uids.in_grid(patterns, u) for u in chosen)
    ):
        log.warning(
            "host assignment does not fit --experts/--num-experts; choosing anew",
            extra={"path": str(path)},
        )
        return None
    return chosen


def save(path: Path, chosen: list[str]) -> None:
    """Write atomically (``services.common.files``: a crash leaves the old file)."""
    atomic_write(path, json.dumps({"uids": chosen}), mode=0o600)
