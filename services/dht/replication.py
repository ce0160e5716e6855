"""Keeping ``num_replicas`` copies of every record as the swarm changes.

- **Republish**: every ``republish_interval`` a node stores the records it holds again on the
  then-nearest nodes. Records somebody stored here within the interval are skipped (another
  replica just republished them), so in a steady swarm one replica does the work.
- **Hand-off** (Kademlia paper, section 2.5): when a node proves a *new* contact that is among
  the ``num_replicas`` nodes nearest one of its records' keys, and this node is the nearest
  holder it knows of (no other known contact nearer the key than itself), it stores that record
  on the newcomer at once. Without it, a plain get misses values once ``num_replicas`` or more
  new nodes sit nearer a key than its replicas, until the next republish. One check per new
  contact costs a pass over the held keys (XOR and a bounded count per key).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from services.common.errors import CallError
from services.dht.records import Entry
from services.dht.storage import StorageFull
from services.dht.store_rpc import store_items

if TYPE_CHECKING:
    from services.dht.node import DHTNode

log = logging.getLogger(__name__)


async def republish(node: DHTNode, force: bool = False) -> int:
    """Store held records again on the current nearest nodes; returns items sent."""
    now, wall = time.monotonic(), node.clock.now()
    items: list[tuple[int, Entry]] = []
    for key_id, entries in node.storage.items():
        last = node.storage.last_stored.get(key_id, 0.0)
        if not force and now - last < node.config.republish_interval:
            continue
        items.extend((key_id, e) for e in entries if e.expiration > wall + 1.0)
    batch = node.config.max_keys_per_request
    for start in range(0, len(items), batch):
        with contextlib.suppress(StorageFull):
            await node.store_many(items[start : start + batch])
    node.metrics.republished(len(items))
    return len(items)


def hand_off_items(node: DHTNode, newcomer: int) -> list[tuple[int, Entry]]:
    """The records ``newcomer`` should get from this node (see the module docstring)."""
    me = node.node_id
    replicas = node.config.num_replicas
    items: list[tuple[int, Entry]] = []
    for key_id, entries in node.storage.items():
        distance = newcomer ^ key_id
        mine = me ^ key_id
        # the newcomer is among the num_replicas nearest known nodes (checked first: for
        # most keys the newcomer is far, and the count stops at the limit at once) ...
        if node.table.count_nearer(key_id, newcomer, replicas) + (mine < distance) >= replicas:
            continue
        # ... and this node is the nearest holder it knows of (the newcomer aside)
        if node.table.count_nearer(key_id, me, 2) > (1 if distance < mine else 0):
            continue
        items.extend((key_id, e) for e in entries)
    return items


async def hand_off(node: DHTNode, newcomer: int, address: str) -> int:
    """Store on a new contact the records it is now a replica of; returns items sent."""
    items = hand_off_items(node, newcomer)
    batch = node.config.max_keys_per_request
    sent = 0
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        with contextlib.suppress(CallError):
            await node.store_rpc(newcomer, address, store_items(chunk, range(len(chunk))))
            sent += len(chunk)
    if sent:
        node.metrics.handed_off(sent)
        log.debug("handed records to a new contact", extra={"peer": address, "items": sent})
    return sent
