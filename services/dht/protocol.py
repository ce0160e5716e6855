"""The peer-to-peer RPC handlers (``dmoe.DHTPeer``): Ping, Store and Find, many keys per call.

:class:`PeerProtocol` holds the handlers as plain coroutines (protobuf in, protobuf out,
:class:`~services.dht.validation.RequestRejected` for bad input), so the gRPC servicer
(:mod:`services.dht.peer_servicer`) and the in-process transport run the same code over the
node's :class:`~services.dht.peer_state.PeerState`. Every call from a DHT node (a request with a
``sender``) reports the caller to the node, which adds it to the routing table once it proved
its id (see ``DHTNode.on_contact``). Input is validated before anything is stored
(:mod:`services.dht.validation`): ids must be 20 bytes, addresses ``host:port``, sizes within
limits, expirations finite and within ``max_ttl``, owned entries signed by their owner
(:mod:`services.dht.records`). Ping replies sign the caller's nonce
(:mod:`services.dht.ping_proof`): that is how a node proves its id is the hash of a key it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from typing import Any

import grpc

from services.common.addresses import check_peer_address
from services.dht.diversity import WINDOW, is_replica
from services.dht.peer_state import PeerState
from services.dht.ping_proof import MAX_NONCE_BYTES, sign_ping
from services.dht.records import PROBLEMS, Entry, ownership_problem
from services.dht.routing import id_to_bytes
from services.dht.storage import StorageFull
from services.dht.validation import (
    ReplyBudget,
    RequestRejected,
    check_batch,
    check_unique,
    invalid,
    parse_entry,
    parse_id,
)
from services.dht.wire import entry_to_proto
from services.proto import dht_pb2


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class PeerProtocol:
    """Handlers of ``dmoe.DHTPeer`` over one node's :class:`PeerState`."""

    def __init__(self, state: PeerState) -> None:
        self.state = state

    async def handle(self, method: str, request: Any, caller_host: str = "") -> Any:
        if method == "Ping":
            return await self.ping(request, caller_host)
        if method == "Store":
            return await self.store(request, caller_host)
        if method == "Find":
            return await self.find(request, caller_host)
        raise RequestRejected(grpc.StatusCode.UNIMPLEMENTED, f"no peer method {method}")

    def _sender(self, sender: dht_pb2.NodeInfo, caller_host: str) -> tuple[int, str] | None:
        """Validate the caller: (claimed id, address to reach it), or None for a non-node
        caller. The claim is only a claim: the node verifies it before trusting it.

        A caller that announces a loopback host but called from elsewhere (a container
        started without ``--announce-host``) is recorded under the host it called from.
        """
        if not sender.node_id and not sender.address:
            return None
        node_id = parse_id(sender.node_id, "sender.node_id")
        try:
            check_peer_address(sender.address)
        except ValueError as exc:
            self.state.rejections.reject(
                "bad_address", "peer announced an address it cannot be reached at",
                source=caller_host, address=sender.address[:100],
            )  # fmt: skip
            raise invalid(f"sender.address {sender.address[:100]!r}: {exc}") from None
        if sender.public_key and hashlib.sha1(sender.public_key).digest() != sender.node_id:
            raise invalid("sender.node_id is not the SHA-1 of sender.public_key")
        address = sender.address
        host, _, port = address.rpartition(":")
        if _is_loopback(host) and caller_host and not _is_loopback(caller_host):
            address = f"[{caller_host}]:{port}" if ":" in caller_host else f"{caller_host}:{port}"
        return node_id, address

    async def ping(self, request: dht_pb2.PingRequest, caller_host: str) -> dht_pb2.PingResponse:
        state = self.state
        if len(request.nonce) > MAX_NONCE_BYTES:
            raise invalid(f"nonce is {len(request.nonce)} bytes, limit {MAX_NONCE_BYTES}")
        sender = self._sender(request.sender, caller_host)
        if sender is not None:
            state.on_contact(*sender)
        return dht_pb2.PingResponse(
            peer=state.info,
            dht_time=state.clock.now(),
            caller_host=caller_host,
            signature=sign_ping(state.identity, request.nonce),
        )

    def _owned(self, key_id: int, entry: Entry, where: str, source: str) -> None:
        """Refuse an entry whose ownership does not hold (see :mod:`services.dht.records`)."""
        problem = ownership_problem(id_to_bytes(key_id), entry, self.state.trusted)
        if problem:
            self.state.rejections.reject(problem, "refused a DHT entry", source=source)
            raise invalid(f"{where}: {PROBLEMS[problem]}")

    async def store(self, request: dht_pb2.StoreRequest, caller_host: str) -> dht_pb2.StoreResponse:
        state = self.state
        config = state.config
        sender = self._sender(request.sender, caller_host)
        source = sender[1] if sender is not None else caller_host
        check_batch(len(request.items), config, "items")
        now = state.clock.now()
        items = []
        for i, item in enumerate(request.items):
            key_id = parse_id(item.key_id, f"items[{i}].key_id")
            entry = parse_entry(item.entry, config, f"items[{i}]", now)
            if not item.demote:
                self._owned(key_id, entry, f"items[{i}]", source)
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
                nearest.append(self._nearest(key_id, replicas, sender_id))
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
                stored.append(self._demote(key_id, entry, item.demote_token, source))
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

    def _demote(self, key_id: int, entry: Entry, token: bytes, source: str) -> bool:
        """A replica copy becomes a cached one, only for the caller that stored it (it
        holds the token this node returned then). True when it was held."""
        state = self.state
        if not hmac.compare_digest(token, state.demote_token(key_id, entry)):
            state.rejections.reject("demote_token", "refused a demote without its token", source)
            return False
        taken = state.storage.take(key_id, entry.slot, entry.expiration)
        if taken is not None:
            with contextlib.suppress(StorageFull):
                state.cache.store(key_id, taken[0], taken[1])
        return taken is not None

    def _nearest(self, key_id: int, count: int, exclude: int | None) -> dht_pb2.FindResult:
        return dht_pb2.FindResult(
            nearest=[
                dht_pb2.NodeInfo(node_id=id_to_bytes(i), address=a)
                for i, a in self.state.table.nearest(key_id, count, exclude=exclude)
            ]
        )

    async def find(self, request: dht_pb2.FindRequest, caller_host: str) -> dht_pb2.FindResponse:
        state = self.state
        sender = self._sender(request.sender, caller_host)
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
            result = self._nearest(key_id, count, sender_id)
            if not request.nodes_only:
                held = state.local_entries(key_id)
                budget.spend(held)
                result.entries.extend(entry_to_proto(e) for e in held)
            results.append(result)
        return dht_pb2.FindResponse(results=results, peer=state.info)
