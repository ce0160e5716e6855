"""A node's background life: joining, staying joined, refreshing, republishing, its state file.

- **Bootstrap** retries the initial peers with backoff until one proves its id (containers
  start in any order), then looks up the node's own id to fill the table; ``joined`` is set
  after that.
- **Maintenance**, every ``maintenance_interval``: purge expired records, re-ping the initial
  peers now and then (a restarted seed learns the swarm again; an orphaned node rejoins),
  refresh buckets untouched for ``refresh_interval`` with a lookup of a random id in them, and
  republish (:mod:`services.dht.replication`).
- **State file** (``--state-file``): the routing table's contacts, written on shutdown and read
  at start; their addresses join the initial peers, so a restarted bootstrap node (one with no
  initial peers of its own) rejoins the swarm it knew instead of starting a new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.addresses import is_peer_address
from services.common.files import atomic_write
from services.dht.replication import republish
from services.dht.routing import random_id

if TYPE_CHECKING:
    from services.dht.node import DHTNode

log = logging.getLogger(__name__)
MAX_STATE_CONTACTS = 1024


async def bootstrap(node: DHTNode) -> None:
    delay = 0.2
    while not node.stopping:
        if await contact_initial_peers(node):
            await node.lookup([node.node_id], "bootstrap", values=False)
            node.joined.set()
            log.info(
                "joined the DHT",
                extra={"address": node.address, "routing_table_size": len(node.table)},
            )
            return
        log.info(
            "initial peers not reachable yet, retrying",
            extra={"peers": ",".join(node.initial_peers[:20]), "retry_in_s": delay},
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, node.config.bootstrap_backoff_max)


async def contact_initial_peers(node: DHTNode) -> bool:
    """Ping every initial peer (a fresh dial each time, so DNS is resolved again)."""
    replies = await asyncio.gather(*(node.ping(p) for p in node.initial_peers))
    return any(r is not None for r in replies)


async def reconnect_seeds(node: DHTNode) -> None:
    """Ping the initial peers again (a handful of pings per interval). A restarted seed
    (no initial peers of its own, maybe a new id) learns the swarm from these pings, so
    nodes can join through it again; a node whose table emptied rejoins."""
    was_empty = not len(node.table)
    if await contact_initial_peers(node) and was_empty:
        await node.lookup([node.node_id], "bootstrap", values=False)


async def run(node: DHTNode) -> None:
    """The maintenance loop (until the node stops); a failed step is logged, not fatal."""
    config = node.config
    next_republish = time.monotonic() + config.republish_interval
    next_seed_check = time.monotonic() + config.seed_ping_interval
    while not node.stopping:
        await asyncio.sleep(config.maintenance_interval)
        try:
            node.storage.purge()
            node.cache.purge()
            now = time.monotonic()
            if node.joined.is_set() and node.initial_peers and now >= next_seed_check:
                next_seed_check = now + config.seed_ping_interval
                await reconnect_seeds(node)
            stale = node.table.stale_buckets(config.refresh_interval)
            if stale and len(node.table):
                targets = [random_id(b.lower, b.upper) for b in stale]
                await node.lookup(targets, "refresh", values=False)
                for bucket in stale:
                    bucket.last_updated = time.monotonic()
            if now >= next_republish:
                next_republish = now + config.republish_interval
                await republish(node)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("maintenance step failed")


def save_state(node: DHTNode, path: Path) -> None:
    """Write the routing table's contacts (atomically: a crash leaves the old file)."""
    contacts = [address for _, address in list(node.table.contacts().items())]
    data = json.dumps({"address": node.address, "contacts": contacts[:MAX_STATE_CONTACTS]})
    atomic_write(path, data, mode=0o600)
    log.info("saved routing state", extra={"path": str(path), "contacts": len(contacts)})


def load_state(path: Path) -> list[str]:
    """The contact addresses saved in ``path`` (empty when missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
        contacts = [a for a in data["contacts"] if isinstance(a, str) and is_peer_address(a)]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning(
            "ignoring unreadable routing state", extra={"path": str(path), "error": str(exc)}
        )
        return []
    return contacts[:MAX_STATE_CONTACTS]
