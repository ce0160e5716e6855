"""``DHTPeer/Store``, both ends: plain, conditional (``replicas`` set), cached and demoting stores.

The caller's end (:func:`send`) is one Store as the node's coalescer sends it (every store to
one peer in one event-loop turn, :mod:`services.dht.coalescer`): build the request, read the
reply into (stored, declined, nearest peers, demote token) per item. The callee's end
(:func:`answer`) checks every item (sizes, expiration, ownership) before storing any, decides
per item whether it is a replica (a conditional store), stores into storage or cache, hands
out demote tokens for the copies it created, and honours a demote only with its token.

Why one module for both ends: the reply's shape and meaning (a flag per item, and with
``replicas`` a decline, the nearest peers and a token per item) is an agreement between the
two ends, as is the demote token (given by the callee, returned by the caller); a change to
either side is checked against the other here. The store *protocol* built on these calls
(which nodes to ask, when to demote) is :mod:`services.dht.replicated_store`.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from services.common.errors import CallError
from services.dht.diversity import WINDOW, is_replica
from services.dht.find_rpc import nearest_result, peers_from
from services.dht.peer_state import PeerState
from services.dht.records import PROBLEMS, Entry, ownership_problem
from services.dht.routing import id_to_bytes
from services.dht.storage import StorageFull
from services.dht.validation import (
    RequestRejected,
    check_batch,
    check_sender,
    invalid,
    parse_entry,
    parse_id,
)
from services.dht.wire import entry_to_proto
from services.proto import dht_pb2

if TYPE_CHECKING:
    from services.dht.node import DHTNode

# a peer that answers with these is gone (or too slow to count on), not just refusing
_UNREACHABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

StoreAnswer = tuple[bool, bool, list[tuple[int, str]], bytes]  # stored, declined, nearest, token


# ---------------------------------------------------------------------- the caller's end
def store_items(
    items: Sequence[tuple[int, Entry]],
    indices: Sequence[int],
    *,
    demote: bool = False,
    cache: bool = False,
) -> list[dht_pb2.StoreItem]:
    """The Store items of ``items[i]`` for each index: replicas, or cached copies (``cache``),
    or demotes (``demote``; each needs its token set)."""
    return [
        dht_pb2.StoreItem(
            key_id=id_to_bytes(items[i][0]),
            entry=entry_to_proto(items[i][1]),
            in_cache=cache,
            demote=demote,
        )
        for i in indices
    ]


async def send(
    node: DHTNode, dest: tuple[int, str, int], items: list[dht_pb2.StoreItem]
) -> list[StoreAnswer]:
    """One Store call. A peer that is unreachable or too slow is reported failed."""
    node_id, address, replicas = dest
    request = dht_pb2.StoreRequest(
        sender=node.info, items=items, replicas=replicas, dht_time=node.clock.now()
    )
    try:
        reply = await node.call(address, "Store", request)
    except CallError as exc:
        if exc.code in _UNREACHABLE:
            node.on_failure(node_id, address)
        raise
    node.answered(reply.peer, address)
    if len(reply.stored) != len(items):
        raise CallError(grpc.StatusCode.INTERNAL, "peer answered the wrong number of flags")
    if not replicas:
        return [(ok, False, [], b"") for ok in reply.stored]
    if len(reply.declined) != len(items) or len(reply.nearest) != len(items):
        raise CallError(grpc.StatusCode.INTERNAL, "peer answered the wrong number of results")
    tokens = list(reply.demote_tokens)
    if len(tokens) != len(items):
        tokens = [b""] * len(items)  # nothing to demote with: copies stay replicas
    return [
        (ok, declined, peers_from(result.nearest), token)
        for ok, declined, result, token in zip(
            reply.stored, reply.declined, reply.nearest, tokens, strict=True
        )
    ]


# ---------------------------------------------------------------------- the callee's end
async def answer(
    state: PeerState, request: dht_pb2.StoreRequest, caller_host: str
) -> dht_pb2.StoreResponse:
    """Store each item (declined where this node is not a replica of a conditional store);
    every item is checked before any is stored. All refused for a full storage: an error."""
    config = state.config
    sender = check_sender(request.sender, caller_host, state.rejections)
    source = sender[1] if sender is not None else caller_host
    check_batch(len(request.items), config, "items")
    now = state.clock.now()
    items = []
    for i, item in enumerate(request.items):
        key_id = parse_id(item.key_id, f"items[{i}].key_id")
        entry = parse_entry(item.entry, config, f"items[{i}]", now)
        if not item.demote:
            _owned(state, key_id, entry, f"items[{i}]", source)
        items.append((key_id, entry, item))
    if sender is not None:
        state.on_contact(*sender)
    replicas = min(request.replicas, config.k)  # bounds the reply's size
    sender_id = sender[0] if sender is not None else None
    skew = state.clock.sender_offset(source, request.dht_time)
    stored, declined, nearest, tokens, full = [], [], [], [], 0
    for key_id, entry, item in items:
        token = b""
        if replicas:
            nearest.append(nearest_result(state, key_id, replicas, sender_id))
            closer = state.table.count_nearer(key_id, state.node_id, replicas)
            if closer < replicas or state.table.host_count() <= 1:
                mine = closer < replicas  # (one host: nothing to prefer)
            else:
                nearer = state.table.nearer(key_id, state.node_id, replicas * WINDOW)
                mine = len(nearer) < replicas * WINDOW and is_replica(
                    state.info.address, nearer, replicas
                )
            declined.append(not mine and not item.demote)
            if declined[-1]:
                stored.append(False)
                tokens.append(token)
                continue
        if item.demote:
            stored.append(_demote(state, key_id, entry, item.demote_token, source))
        else:
            target = state.cache if item.in_cache else state.storage
            keep = entry.expiration - skew if skew > 0 else None
            # a token only for a copy this store created: re-storing an entry the node
            # already held (read through Find) must not buy the right to demote it
            fresh = replicas and not item.in_cache and not target.holds(key_id, entry)
            try:
                stored.append(target.store(key_id, entry, keep, caller_host))
            except StorageFull:
                stored.append(False)
                full += 1
            if stored[-1] and fresh:
                token = state.demote_token(key_id, entry)
        tokens.append(token)
    if full and not any(stored):
        raise RequestRejected(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"storage full ({config.max_records} entries, or this caller's quota: "
            f"{config.source_share:g} of them); {full} items refused",
        )
    return dht_pb2.StoreResponse(
        stored=stored,
        peer=state.info,
        declined=declined,
        nearest=nearest,
        demote_tokens=tokens if replicas else [],
    )


def _owned(state: PeerState, key_id: int, entry: Entry, where: str, source: str) -> None:
    """Refuse an entry whose ownership does not hold (see :mod:`services.dht.records`)."""
    problem = ownership_problem(id_to_bytes(key_id), entry, state.trusted)
    if problem:
        state.rejections.reject(problem, "refused a DHT entry", source=source)
        raise invalid(f"{where}: {PROBLEMS[problem]}")


def _demote(state: PeerState, key_id: int, entry: Entry, token: bytes, source: str) -> bool:
    """A replica copy becomes a cached one, only for the caller that stored it (it
    holds the token this node returned then). True when it was held."""
    if not hmac.compare_digest(token, state.demote_token(key_id, entry)):
        state.rejections.reject("demote_token", "refused a demote without its token", source)
        return False
    taken = state.storage.take(key_id, entry.slot, entry.expiration)
    if taken is not None:
        with contextlib.suppress(StorageFull):
            state.cache.store(key_id, taken[0], taken[1])
    return taken is not None
