"""Entries and node descriptions between their in-memory form and ``dmoe.DHTPeer`` messages.

Conversion only: checking what a peer sent is :mod:`services.dht.validation`'s.
"""

from __future__ import annotations

import hashlib

from services.common.identity import Identity
from services.dht.records import Entry
from services.proto import dht_pb2


def parse_wire_entry(entry: dht_pb2.ValueEntry) -> Entry:
    """A wire entry as it is (no checks: for answers, whose ownership is checked next)."""
    subkey = entry.subkey if entry.HasField("subkey") else None
    return Entry(subkey, entry.value, entry.expiration, entry.owner, entry.signature)


def entry_to_proto(entry: Entry) -> dht_pb2.ValueEntry:
    message = dht_pb2.ValueEntry(
        value=entry.value,
        expiration=entry.expiration,
        owner=entry.owner,
        signature=entry.signature,
    )
    if entry.subkey is not None:
        message.subkey = entry.subkey
    return message


def node_info(identity: Identity, address: str) -> dht_pb2.NodeInfo:
    """This node as peers see it; its id is the SHA-1 of its public key."""
    node_id = hashlib.sha1(identity.public_key).digest()
    return dht_pb2.NodeInfo(node_id=node_id, address=address, public_key=identity.public_key)
