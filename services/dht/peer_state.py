"""The part of a DHT node that its peer handlers read and change (:class:`PeerState`)."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.common.identity import Identity
from services.common.rejections import Rejections
from services.dht.clock import DHTClock
from services.dht.records import Entry
from services.dht.routing import RoutingTable, id_to_bytes
from services.dht.storage import Storage, merge_entries
from services.dht.wire import node_info
from services.proto import dht_pb2

if TYPE_CHECKING:
    from services.dht.config import NodeConfig


@dataclass(eq=False)
class PeerState:
    """What the peer handlers read and change: the node's parts they need, nothing more.

    The node owns it and shares the same objects (table, storage, ...); ``on_contact`` is how
    a handler reports a caller (the node verifies the claim before trusting it).
    """

    config: NodeConfig
    identity: Identity
    node_id: int
    table: RoutingTable
    storage: Storage
    cache: Storage
    clock: DHTClock
    rejections: Rejections
    trusted: frozenset[bytes] | None
    on_contact: Callable[[int, str], None]
    info: dht_pb2.NodeInfo = field(default_factory=dht_pb2.NodeInfo)
    stopping: bool = False
    demote_secret: bytes = field(default_factory=lambda: os.urandom(32))

    @classmethod
    def create(
        cls,
        config: NodeConfig,
        identity: Identity,
        clock: DHTClock,
        rejections: Rejections,
        trusted: frozenset[bytes] | None,
        on_contact: Callable[[int, str], None],
    ) -> PeerState:
        node_id = int.from_bytes(hashlib.sha1(identity.public_key).digest(), "big")
        return cls(
            config=config,
            identity=identity,
            node_id=node_id,
            table=RoutingTable(node_id, config.k, config.depth_modulo),
            storage=Storage(
                config.max_records,
                clock=clock.now,
                max_bytes=config.max_storage_bytes,
                max_per_source=max(1, int(config.max_records * config.source_share)),
                max_bytes_per_source=int(config.max_storage_bytes * config.source_share),
                max_unowned=max(1, int(config.max_records * config.unowned_share)),
            ),
            cache=Storage(
                config.max_cache_records,
                evict_when_full=True,
                clock=clock.now,
                max_bytes=config.max_cache_bytes,
            ),
            clock=clock,
            rejections=rejections,
            trusted=trusted,
            on_contact=on_contact,
        )

    def announce(self, address: str) -> None:
        self.info = node_info(self.identity, address)

    def local_entries(self, key_id: int) -> list[Entry]:
        """What this node holds for ``key_id``, replica and cached copies merged."""
        cached = self.cache.get(key_id)
        held = self.storage.get(key_id)
        return merge_entries([*held, *cached], self.clock.now()) if cached else held

    def demote_token(self, key_id: int, entry: Entry) -> bytes:
        """What a conditional store returns for an entry it stored: only that caller can
        later demote the copy (a stranger who learned the entry through Find cannot)."""
        message = id_to_bytes(key_id) + struct.pack(">d", entry.expiration) + entry.owner
        message += b"\x00" + (entry.subkey if entry.subkey is not None else b"\xff")
        return hmac.new(self.demote_secret, message, hashlib.sha256).digest()[:16]
