"""The client-facing ``dmoe.DHT`` service: Put/Get of many keys, NodeStatus.

Keys are arbitrary bytes hashed to ids here (SHA-1); the caller never sees ids. Put and
Get validate the whole request first (sizes, finite expirations within ``max_ttl``, batch
size, owned entries signed by their owner) and answer INVALID_ARGUMENT before touching the
DHT, so a bad item never half-applies a batch. Replies carry the node's ``dht_time``, so a
client whose clock is off can base its expirations on the DHT's clock.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.common.limits import peer_key
from services.common.link import LinkServer, protobuf_method
from services.dht.node import DHTNode
from services.dht.records import PROBLEMS, ownership_problem
from services.dht.routing import id_to_bytes, key_to_id
from services.dht.validation import (
    ReplyBudget,
    RequestRejected,
    check_batch,
    check_unique,
    invalid,
    parse_entry,
)
from services.dht.wire import entry_to_proto
from services.proto import dht_pb2, dht_pb2_grpc


def _key_id(key: bytes, node: DHTNode, where: str) -> int:
    if not key:
        raise invalid(f"{where}: empty key")
    if len(key) > node.config.max_key_bytes:
        raise invalid(f"{where}: key is {len(key)} bytes, limit {node.config.max_key_bytes}")
    return key_to_id(key)


class DHTServicer(dht_pb2_grpc.DHTServicer):
    """``dmoe.DHT``: each method once as a plain coroutine (request -> reply, raising
    :class:`RequestRejected`), served unary and over the client's link (``Link``)."""

    def __init__(self, node: DHTNode) -> None:
        self.node = node
        self.link = LinkServer(
            {
                "Put": protobuf_method(dht_pb2.PutRequest, self.put),
                "Get": protobuf_method(dht_pb2.GetRequest, self.get),
                "NodeStatus": protobuf_method(dht_pb2.NodeStatusRequest, self.node_status),
            }
        )

    def _check_up(self) -> None:
        if self.node.stopping:
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "DHT node is shutting down")

    async def put(self, request: dht_pb2.PutRequest, peer: str) -> dht_pb2.PutResponse:
        node = self.node
        self._check_up()
        now = node.clock.now()
        check_batch(len(request.items), node.config, "items")
        items = []
        for i, item in enumerate(request.items):
            key_id = _key_id(item.key, node, f"items[{i}]")
            entry = parse_entry(item.entry, node.config, f"items[{i}]", now)
            problem = ownership_problem(id_to_bytes(key_id), entry, node.trusted)
            if problem:
                node.rejections.reject(problem, "refused a Put", source=peer_key(peer))
                raise invalid(f"items[{i}]: {PROBLEMS[problem]}")
            items.append((key_id, entry))
        live = [i for i, (_, entry) in enumerate(items) if entry.expiration > now]
        counts, full = await node.store_many([items[i] for i in live], peer_key(peer))
        replicas = [0] * len(items)
        for index, count in zip(live, counts, strict=True):
            replicas[index] = count
        if full and live and not any(counts):
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "DHT storage full: no node accepted the items"
            )
        return dht_pb2.PutResponse(
            stored=[c > 0 for c in replicas], replicas=replicas, dht_time=node.clock.now()
        )

    async def get(self, request: dht_pb2.GetRequest, peer: str) -> dht_pb2.GetResponse:
        node = self.node
        self._check_up()
        check_batch(len(request.keys), node.config, "keys")
        key_ids = [_key_id(k, node, f"keys[{i}]") for i, k in enumerate(request.keys)]
        check_unique(key_ids, "keys")
        found = await node.get_many(key_ids, latest=request.latest)
        budget = ReplyBudget(node.config.max_reply_bytes)
        for entries in found:
            budget.spend(entries)
        return dht_pb2.GetResponse(
            results=[
                dht_pb2.GetResult(found=bool(entries), entries=[entry_to_proto(e) for e in entries])
                for entries in found
            ],
            dht_time=node.clock.now(),
        )

    async def node_status(
        self, request: dht_pb2.NodeStatusRequest, peer: str
    ) -> dht_pb2.NodeStatusResponse:
        node = self.node
        return dht_pb2.NodeStatusResponse(
            node=node.info,
            routing_table_size=len(node.table),
            stored_records=len(node.storage),
            joined=node.joined.is_set(),
            peers=[
                dht_pb2.NodeInfo(node_id=id_to_bytes(i), address=a)
                for i, a in node.table.contacts().items()
            ],
            dht_time=node.clock.now(),
            clock_correction=node.clock.correction,
        )

    # ---- gRPC adapters: a RequestRejected (a StatusError) raised here is answered as its
    # status by the server guard (services.common.errors.status_of), as over a link
    async def _unary(self, method: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await method(request, context.peer())

    async def Put(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary(self.put, request, context)

    async def Get(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary(self.get, request, context)

    async def NodeStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unary(self.node_status, request, context)

    def Link(self, batches: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.link.serve(batches, context)
