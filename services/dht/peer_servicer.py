"""The gRPC face of the peer handlers: ``dmoe.DHTPeer`` as plain calls and over a peer link."""

from __future__ import annotations

from typing import Any

import grpc

from services.common.link import LinkServer, protobuf_method
from services.dht.protocol import PeerProtocol
from services.dht.validation import RequestRejected, caller_host
from services.proto import dht_pb2, dht_pb2_grpc

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
