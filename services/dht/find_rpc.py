"""``DHTPeer/Find``, both ends: many keys per call, each answered with entries and nearest peers.

The caller's end (:func:`send`) is one Find as the lookup's coalescer sends it (every key asked
of one peer in one event-loop turn, :mod:`services.dht.coalescer`): build the request, read the
reply, and keep of it only what the peer could not have forged (:func:`believable`: entries
whose ownership holds; :func:`peers_from`: well-formed ids at ``host:port`` addresses). The
callee's end (:func:`answer`) checks the request and answers each key from its routing table
and, unless ``nodes_only``, from its storage, within the reply budget.

Why one module for both ends: what an answer may hold (how many peers, which entries, how
large) and what the caller believes of it are one agreement; a reader checking either side
of it finds the other a screen away. A conditional Store answers with nearest peers too, so
:mod:`services.dht.store_rpc` reuses :func:`nearest_result` and :func:`peers_from`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc

from services.common.addresses import is_peer_address
from services.common.errors import CallError
from services.dht.peer_state import PeerState
from services.dht.records import Entry, ownership_problem
from services.dht.routing import ID_BYTES, id_to_bytes
from services.dht.validation import ReplyBudget, check_batch, check_sender, check_unique, parse_id
from services.dht.wire import entry_to_proto, parse_wire_entry
from services.proto import dht_pb2

if TYPE_CHECKING:
    from services.dht.node import DHTNode

Answer = tuple[list[Entry], list[tuple[int, str]]]  # a peer's (entries, nearest peers) per key


# ---------------------------------------------------------------------- the caller's end
async def send(node: DHTNode, dest: tuple[int, str, bool, int], targets: list[int]) -> list[Answer]:
    """One Find call to ``dest`` (peer id, address, nodes only, beam). A peer that fails the
    call (other than busy) or answers the wrong number of results is reported failed."""
    peer_id, address, nodes_only, beam = dest
    asked = list(dict.fromkeys(targets))  # lookups batched together may share a key
    request = dht_pb2.FindRequest(
        sender=node.info,
        key_ids=[id_to_bytes(t) for t in asked],
        nodes_only=nodes_only,
        max_nearest=beam,
    )
    try:
        reply = await node.call(address, "Find", request)
    except CallError as exc:
        if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy or too large: not dead
            node.on_failure(peer_id, address)
        raise
    if len(reply.results) != len(asked):
        node.on_failure(peer_id, address)
        raise CallError(grpc.StatusCode.INTERNAL, "peer answered the wrong number of results")
    node.answered(reply.peer, address)
    answers = {
        target: (believable(node, target, result.entries, address), peers_from(result.nearest))
        for target, result in zip(asked, reply.results, strict=True)
    }
    return [answers[t] for t in targets]


def believable(
    node: DHTNode, key_id: int, entries: Iterable[dht_pb2.ValueEntry], source: str
) -> list[Entry]:
    """A peer's answer for ``key_id`` without what it could have forged: entries whose
    ownership does not hold would otherwise shadow real ones in the merge."""
    key = id_to_bytes(key_id)
    kept = []
    for e in entries:
        entry = parse_wire_entry(e)
        problem = ownership_problem(key, entry, node.trusted)
        if problem:
            node.rejections.reject(problem, "dropped an entry a peer returned", source)
            continue
        kept.append(entry)
    return kept


def peers_from(infos: Iterable[dht_pb2.NodeInfo]) -> list[tuple[int, str]]:
    """(id, address) of well-formed peer infos; malformed ones (and addresses that are not
    ``host:port``: a stranger's list must not make us dial ``unix:`` sockets) are skipped."""
    peers = []
    for info in infos:
        raw = info.node_id
        if len(raw) == ID_BYTES and is_peer_address(info.address):
            peers.append((int.from_bytes(raw, "big"), info.address))
    return peers


# ---------------------------------------------------------------------- the callee's end
async def answer(
    state: PeerState, request: dht_pb2.FindRequest, caller_host: str
) -> dht_pb2.FindResponse:
    """Each key's nearest peers (never the caller itself) and, unless ``nodes_only``, the
    entries held for it; a key named twice is refused, a reply past the budget too."""
    sender = check_sender(request.sender, caller_host, state.rejections)
    check_batch(len(request.key_ids), state.config, "key_ids")
    key_ids = [parse_id(k, f"key_ids[{i}]") for i, k in enumerate(request.key_ids)]
    check_unique(key_ids, "key_ids")
    if sender is not None:
        state.on_contact(*sender)
    sender_id = sender[0] if sender is not None else None
    count = min(request.max_nearest or state.config.k, state.config.k)
    budget = ReplyBudget(state.config.max_reply_bytes)
    results = []
    for key_id in key_ids:
        result = nearest_result(state, key_id, count, sender_id)
        if not request.nodes_only:
            held = state.local_entries(key_id)
            budget.spend(held)
            result.entries.extend(entry_to_proto(e) for e in held)
        results.append(result)
    return dht_pb2.FindResponse(results=results, peer=state.info)


def nearest_result(
    state: PeerState, key_id: int, count: int, exclude: int | None
) -> dht_pb2.FindResult:
    return dht_pb2.FindResult(
        nearest=[
            dht_pb2.NodeInfo(node_id=id_to_bytes(i), address=a)
            for i, a in state.table.nearest(key_id, count, exclude=exclude)
        ]
    )
