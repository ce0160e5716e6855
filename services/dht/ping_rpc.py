"""``DHTPeer/Ping``, both ends: how a node proves its id, and how the caller checks the proof.

A node id is the SHA-1 of the node's public key. The caller sends a random nonce; the callee
signs it (:func:`answer`), so a reply whose key hashes to the claimed id and whose signature
over the nonce verifies proves the id (:func:`proven_id`); a claim without it is only a claim
(``DHTNode.on_contact`` verifies before it trusts). The tag keeps these signatures apart from
every other thing the key signs.

Why one module for both ends: the proof is a pair (what the callee signs, what the caller
verifies), and the two must change together; reading either end alone says half of it.
What a proof earns the callee (a place in the routing table) is the node's
(``DHTNode.proved``, ``DHTNode.on_contact``).
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from services.common.errors import CallError
from services.common.identity import PUBLIC_KEY_BYTES, Identity, verify
from services.dht.peer_state import PeerState
from services.dht.validation import check_sender, invalid
from services.proto import dht_pb2

if TYPE_CHECKING:
    from services.dht.node import DHTNode

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


# ---------------------------------------------------------------------- the caller's end
async def ping(node: DHTNode, address: str) -> dht_pb2.PingResponse | None:
    """Ping ``address``; the reply must prove the peer's id (it signs our nonce). A proven
    peer enters the routing table and its clock is compared with ours; None when it
    does not answer or cannot prove its id."""
    nonce = os.urandom(16)
    sent = node.clock.source()
    try:
        reply = await node.call(address, "Ping", dht_pb2.PingRequest(sender=node.info, nonce=nonce))
    except CallError:
        return None
    peer_id = proven_id(reply.peer, nonce, reply.signature)
    if peer_id is None:
        node.unproved(address)
        return None
    node.metrics.verification("proved")
    node.clock.observe(address, reply.dht_time, sent, node.clock.source())
    node.proved(address, peer_id)
    node.on_contact(peer_id, address)
    return reply


# ---------------------------------------------------------------------- the callee's end
async def answer(
    state: PeerState, request: dht_pb2.PingRequest, caller_host: str
) -> dht_pb2.PingResponse:
    """Sign the caller's nonce and tell it our DHT time and the host it called from."""
    if len(request.nonce) > MAX_NONCE_BYTES:
        raise invalid(f"nonce is {len(request.nonce)} bytes, limit {MAX_NONCE_BYTES}")
    sender = check_sender(request.sender, caller_host, state.rejections)
    if sender is not None:
        state.on_contact(*sender)
    return dht_pb2.PingResponse(
        peer=state.info,
        dht_time=state.clock.now(),
        caller_host=caller_host,
        signature=sign_ping(state.identity, request.nonce),
    )
