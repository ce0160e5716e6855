"""How a node proves its id in a Ping reply: it signs the caller's nonce.

A node id is the SHA-1 of the node's public key, so a reply whose key hashes to the claimed id
and whose signature over the nonce verifies proves the id; a claim without it is only a claim
(``DHTNode.on_contact`` verifies before it trusts). The tag keeps these signatures apart from
every other thing the key signs.
"""

from __future__ import annotations

import hashlib

from services.common.identity import PUBLIC_KEY_BYTES, Identity, verify
from services.proto import dht_pb2

PING_TAG = b"dmoe.dht.ping.v1\x00"
MAX_NONCE_BYTES = 32


def sign_ping(identity: Identity, nonce: bytes) -> bytes:
    return identity.sign(PING_TAG + nonce)


def proven_id(peer: dht_pb2.NodeInfo, nonce: bytes, signature: bytes) -> int | None:
    """The peer's id when its ping reply proves it (the id is the hash of the key that
    signed our nonce); None otherwise."""
    key = peer.public_key
    if len(key) != PUBLIC_KEY_BYTES or hashlib.sha1(key).digest() != peer.node_id:
        return None
    if not verify(key, signature, PING_TAG + nonce):
        return None
    return int.from_bytes(peer.node_id, "big")
