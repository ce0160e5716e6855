"""The peer-to-peer RPC handlers (``dmoe.DHTPeer``): Ping, Store and Find, many keys per call.

:class:`PeerProtocol` answers a call by method name, with plain coroutines (protobuf in,
protobuf out, :class:`~services.dht.validation.RequestRejected` for bad input), so the gRPC
servicer (:mod:`services.dht.peer_servicer`) and the in-process transport run the same code
over the node's :class:`~services.dht.peer_state.PeerState`.

Each RPC's handler lives with its caller's end, one module per RPC
(:mod:`services.dht.ping_rpc`, :mod:`services.dht.store_rpc`, :mod:`services.dht.find_rpc`):
what a request may hold and what its reply means is one agreement, read in one place. This
class only routes, and is the one seam a test replaces a handler at (``protocol.find = ...``)
to play a hostile peer.

What every handler does alike: a call from a DHT node (a request with a ``sender``) reports
the caller to the node, which adds it to the routing table once it proved its id (see
``DHTNode.on_contact``); input is validated before anything is stored
(:mod:`services.dht.validation`): ids must be 20 bytes, addresses ``host:port``, sizes within
limits, expirations finite and within ``max_ttl``, owned entries signed by their owner
(:mod:`services.dht.records`).
"""

from __future__ import annotations

from typing import Any

import grpc

from services.dht import find_rpc, ping_rpc, store_rpc
from services.dht.peer_state import PeerState
from services.dht.validation import RequestRejected
from services.proto import dht_pb2


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

    async def ping(self, request: dht_pb2.PingRequest, caller_host: str) -> dht_pb2.PingResponse:
        return await ping_rpc.answer(self.state, request, caller_host)

    async def store(self, request: dht_pb2.StoreRequest, caller_host: str) -> dht_pb2.StoreResponse:
        return await store_rpc.answer(self.state, request, caller_host)

    async def find(self, request: dht_pb2.FindRequest, caller_host: str) -> dht_pb2.FindResponse:
        return await find_rpc.answer(self.state, request, caller_host)
