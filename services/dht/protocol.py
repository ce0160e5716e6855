"""The peer-to-peer RPCs (``dmoe.DHTPeer``): Ping, Store and Find, many keys per call.

:class:`PeerProtocol` holds the handlers as plain coroutines (protobuf in, protobuf out,
:class:`RequestRejected` for bad input), so the gRPC servicer and the in-process transport
run the same code. Every call from a DHT node (a request with a ``sender``) refreshes the
caller in the routing table: that is how a node learns who is alive without extra traffic.
Input is validated before anything is stored: ids must be 20 bytes, sizes within limits,
expirations finite.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import grpc

from services.dht.routing import id_from_bytes, id_to_bytes
from services.dht.storage import Entry, StorageFull
from services.proto import dht_pb2, dht_pb2_grpc

if TYPE_CHECKING:
    from services.dht.config import NodeConfig
    from services.dht.node import DHTNode


class RequestRejected(Exception):
    """Bad or unservable input; becomes a gRPC status with ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse_id(raw: bytes, what: str) -> int:
    try:
        return id_from_bytes(raw)
    except ValueError as exc:
        raise invalid(f"{what}: {exc}") from None


def parse_entry(entry: dht_pb2.ValueEntry, config: NodeConfig, where: str) -> Entry:
    """Check sizes and expiration of a wire entry."""
    subkey = entry.subkey if entry.HasField("subkey") else None
    if subkey is not None and len(subkey) > config.max_subkey_bytes:
        raise invalid(f"{where}: subkey is {len(subkey)} bytes, limit {config.max_subkey_bytes}")
    if len(entry.value) > config.max_value_bytes:
        raise invalid(f"{where}: value is {len(entry.value)} bytes, limit {config.max_value_bytes}")
    if not math.isfinite(entry.expiration):
        raise invalid(f"{where}: expiration must be a finite UNIX time")
    return Entry(subkey, entry.value, entry.expiration)


def entry_to_proto(entry: Entry) -> dht_pb2.ValueEntry:
    message = dht_pb2.ValueEntry(value=entry.value, expiration=entry.expiration)
    if entry.subkey is not None:
        message.subkey = entry.subkey
    return message


def check_batch(count: int, config: NodeConfig, what: str) -> None:
    if count > config.max_keys_per_request:
        raise invalid(f"{count} {what} in one request, limit {config.max_keys_per_request}")


def caller_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``; ``ipv6:%5B::1%5D:5678`` -> ``::1``; else ''."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    return rest.rsplit(":", 1)[0].strip("[]")


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


class PeerProtocol:
    """Handlers of ``dmoe.DHTPeer`` for one node."""

    def __init__(self, node: DHTNode) -> None:
        self.node = node

    async def handle(self, method: str, request: Any, caller_host: str = "") -> Any:
        if method == "Ping":
            return await self.ping(request, caller_host)
        if method == "Store":
            return await self.store(request, caller_host)
        if method == "Find":
            return await self.find(request, caller_host)
        raise RequestRejected(grpc.StatusCode.UNIMPLEMENTED, f"no peer method {method}")

    def _sender(self, sender: dht_pb2.NodeInfo, caller_host: str) -> tuple[int, str] | None:
        """Validate the caller: (id, address to reach it), or None for a non-node caller.

        A caller that announces a loopback host but called from elsewhere (a container
        started without ``--announce-host``) is recorded under the host it called from.
        """
        if not sender.node_id and not sender.address:
            return None
        node_id = parse_id(sender.node_id, "sender.node_id")
        host, sep, port = sender.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise invalid(f"sender.address {sender.address[:100]!r} is not host:port")
        address = sender.address
        if _is_loopback(host) and caller_host and not _is_loopback(caller_host):
            address = f"[{caller_host}]:{port}" if ":" in caller_host else f"{caller_host}:{port}"
        return node_id, address

    async def ping(self, request: dht_pb2.PingRequest, caller_host: str) -> dht_pb2.PingResponse:
        sender = self._sender(request.sender, caller_host)
        if sender is not None:
            self.node.on_contact(*sender)
        return dht_pb2.PingResponse(
            peer=self.node.info, dht_time=time.time(), caller_host=caller_host
        )

    async def store(self, request: dht_pb2.StoreRequest, caller_host: str) -> dht_pb2.StoreResponse:
        config = self.node.config
        sender = self._sender(request.sender, caller_host)
        check_batch(len(request.items), config, "items")
        items = [
            (
                parse_id(item.key_id, f"items[{i}].key_id"),
                parse_entry(item.entry, config, f"items[{i}]"),
                item.in_cache,
            )
            for i, item in enumerate(request.items)
        ]
        if sender is not None:
            self.node.on_contact(*sender)
        replicas = min(request.replicas, config.k)  # bounds the reply's size
        sender_id = sender[0] if sender is not None else None
        stored, declined, nearest, full = [], [], [], 0
        for (key_id, entry, in_cache), item in zip(items, request.items, strict=True):
            if replicas:
                nearest.append(self._nearest(key_id, replicas, sender_id))
                closer = self.node.table.count_nearer(key_id, self.node.node_id, replicas)
                declined.append(closer >= replicas and not item.demote)
                if declined[-1]:
                    stored.append(False)
                    continue
            if item.demote:  # a replica copy becomes a cached one (flag: it was held)
                taken = self.node.storage.take(key_id, entry.subkey, entry.expiration)
                if taken is not None:
                    with contextlib.suppress(StorageFull):
                        self.node.cache.store(key_id, *taken)
                stored.append(taken is not None)
                continue
            target = self.node.cache if in_cache else self.node.storage
            try:
                stored.append(target.store(key_id, entry.subkey, entry.value, entry.expiration))
            except StorageFull:
                stored.append(False)
                full += 1
        if full and not any(stored):
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"storage full ({config.max_records} entries); {full} items refused",
            )
        return dht_pb2.StoreResponse(
            stored=stored, peer=self.node.info, declined=declined, nearest=nearest
        )

    def _nearest(self, key_id: int, count: int, exclude: int | None) -> dht_pb2.FindResult:
        return dht_pb2.FindResult(
            nearest=[
                dht_pb2.NodeInfo(node_id=id_to_bytes(i), address=a)
                for i, a in self.node.table.nearest(key_id, count, exclude=exclude)
            ]
        )

    async def find(self, request: dht_pb2.FindRequest, caller_host: str) -> dht_pb2.FindResponse:
        node = self.node
        sender = self._sender(request.sender, caller_host)
        check_batch(len(request.key_ids), node.config, "key_ids")
        key_ids = [parse_id(k, f"key_ids[{i}]") for i, k in enumerate(request.key_ids)]
        if sender is not None:
            node.on_contact(*sender)
        sender_id = sender[0] if sender is not None else None
        count = min(request.max_nearest or node.config.k, node.config.k)
        results = []
        for key_id in key_ids:
            result = self._nearest(key_id, count, sender_id)
            if not request.nodes_only:
                held = node.local_entries(key_id)
                result.entries.extend(entry_to_proto(e) for e in held)
            results.append(result)
        return dht_pb2.FindResponse(results=results, peer=node.info)


class PeerServicer(dht_pb2_grpc.DHTPeerServicer):
    """gRPC adapter: RequestRejected -> status with its message."""

    def __init__(self, protocol: PeerProtocol) -> None:
        self.protocol = protocol

    async def _run(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.protocol.node.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
        host = caller_host(context.peer() or "")
        try:
            return await self.protocol.handle(method, request, caller_host=host)
        except RequestRejected as exc:
            await context.abort(exc.code, exc.message)

    async def Ping(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._run("Ping", request, context)

    async def Store(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._run("Store", request, context)

    async def Find(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._run("Find", request, context)
