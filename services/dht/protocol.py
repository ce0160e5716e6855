"""The peer-to-peer RPCs (``dmoe.DHTPeer``): Ping, Store and Find, many keys per call.

:class:`PeerProtocol` holds the handlers as plain coroutines (protobuf in, protobuf out,
:class:`RequestRejected` for bad input), so the gRPC servicer and the in-process transport
run the same code. Every call from a DHT node (a request with a ``sender``) reports the caller
to the node, which adds it to the routing table once it proved its id (see
``DHTNode.on_contact``). Input is validated before anything is stored: ids must be 20 bytes,
addresses ``host:port``, sizes within limits, expirations finite and within ``max_ttl``,
owned entries signed by their owner (:mod:`services.dht.records`). Ping replies sign the
caller's nonce: that is how a node proves its id is the hash of a key it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from services.common.addresses import check_peer_address, peer_host
from services.common.errors import StatusError
from services.common.identity import PUBLIC_KEY_BYTES, Identity, verify
from services.common.link import LinkServer, protobuf_method
from services.common.rejections import Rejections
from services.dht.clock import DHTClock
from services.dht.diversity import WINDOW, is_replica
from services.dht.records import PROBLEMS, Entry, ownership_problem
from services.dht.routing import RoutingTable, id_from_bytes, id_to_bytes
from services.dht.storage import Storage, StorageFull, merge_entries
from services.proto import dht_pb2, dht_pb2_grpc

if TYPE_CHECKING:
    from services.dht.config import NodeConfig


class RequestRejected(StatusError):
    """Bad or unservable input to a DHT node; answered with its gRPC status and message."""


def invalid(message: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse_id(raw: bytes, what: str) -> int:
    try:
        return id_from_bytes(raw)
    except ValueError as exc:
        raise invalid(f"{what}: {exc}") from None


PING_TAG = b"dmoe.dht.ping.v1\x00"
MAX_NONCE_BYTES = 32


def parse_entry(
    entry: dht_pb2.ValueEntry, config: NodeConfig, where: str, now: float | None = None
) -> Entry:
    """Check sizes and expiration of a wire entry (``now``: the node's DHT time, for the
    ``max_ttl`` cap). Ownership is checked apart: it needs the key id."""
    subkey = entry.subkey if entry.HasField("subkey") else None
    if subkey is not None and len(subkey) > config.max_subkey_bytes:
        raise invalid(f"{where}: subkey is {len(subkey)} bytes, limit {config.max_subkey_bytes}")
    if len(entry.value) > config.max_value_bytes:
        raise invalid(f"{where}: value is {len(entry.value)} bytes, limit {config.max_value_bytes}")
    if not math.isfinite(entry.expiration):
        raise invalid(f"{where}: expiration must be a finite UNIX time")
    if now is not None and entry.expiration > now + config.max_ttl:
        raise invalid(
            f"{where}: expiration is {entry.expiration - now:.0f} s ahead of this node's "
            f"clock, limit {config.max_ttl:.0f} s (--max-ttl)"
        )
    if len(entry.owner) > PUBLIC_KEY_BYTES or len(entry.signature) > 2 * PUBLIC_KEY_BYTES:
        raise invalid(f"{where}: owner or signature too long")
    return Entry(subkey, entry.value, entry.expiration, entry.owner, entry.signature)


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


def check_batch(count: int, config: NodeConfig, what: str) -> None:
    if count > config.max_keys_per_request:
        raise invalid(f"{count} {what} in one request, limit {config.max_keys_per_request}")


def check_unique(keys: Sequence[Any], what: str) -> None:
    """A key named twice in one Get/Find would be answered twice: one request could make
    the node copy a large record thousands of times (honest callers ask each key once)."""
    if len(set(keys)) != len(keys):
        first: dict[Any, int] = {}
        for i, key in enumerate(keys):
            if key in first:
                raise invalid(f"{what}[{i}] repeats {what}[{first[key]}]; ask each key once")
            first[key] = i


def entry_bytes(entry: Entry) -> int:
    """About what an entry costs in a reply (for ``max_reply_bytes``)."""
    subkey = entry.subkey or b""
    return len(entry.value) + len(subkey) + len(entry.owner) + len(entry.signature) + 24


class ReplyBudget:
    """Counts the bytes of entries put in one reply; RESOURCE_EXHAUSTED past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def spend(self, entries: Sequence[Entry]) -> None:
        self.used += sum(entry_bytes(e) for e in entries)
        if self.limit and self.used > self.limit:
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"reply would hold over {self.limit} bytes of entries (--max-reply-bytes); "
                "ask for fewer keys at once",
            )


def caller_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``; ``ipv6:%5B::1%5D:5678`` -> ``::1``; else ''."""
    return peer_host(peer) or ""


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


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


_REQUESTS = {
    "Ping": dht_pb2.PingRequest,
    "Store": dht_pb2.StoreRequest,
    "Find": dht_pb2.FindRequest,
}


class PeerServicer(dht_pb2_grpc.DHTPeerServicer):
    """gRPC adapter (a RequestRejected raised is answered as its status by the server guard);
    the same three methods over a peer link (``Link``, :mod:`services.common.link`), which is
    what nodes use."""

    def __init__(self, protocol: PeerProtocol) -> None:
        self.protocol = protocol
        self.link = LinkServer(
            {name: protobuf_method(kind, self._linked(name)) for name, kind in _REQUESTS.items()}
        )

    def _linked(self, method: str) -> Any:
        async def handle(request: Any, peer: str) -> Any:
            if self.protocol.state.stopping:
                raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
            return await self.protocol.handle(method, request, caller_host=caller_host(peer))

        return handle

    def Link(self, frames: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.link.serve(frames, context)

    async def _run(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.protocol.state.stopping:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
        host = caller_host(context.peer() or "")
        return await self.protocol.handle(method, request, caller_host=host)

    async def Ping(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._run("Ping", request, context)

    async def Store(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._run("Store", request, context)

    async def Find(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._run("Find", request, context)
