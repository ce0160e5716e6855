"""How a node reaches its peers: a tiny interface and two implementations.

The node logic only ever calls :meth:`Transport.call` with a ``dmoe.DHTPeer`` method
name and its protobuf request, so the same node code runs
- over real gRPC (:class:`GrpcTransport`: one cached channel per peer address, short
  deadlines, the channel dropped after a failure so the next attempt dials afresh and
  re-resolves DNS), or
- in one process (:class:`InProcessTransport`: calls the callee's handlers directly),
  which lets a benchmark run a thousand nodes on two cores. Killing a node there means
  unregistering it: calls to it fail like a refused connection.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import grpc

from services.common.channel_cache import ChannelCache
from services.common.channels import channel_options
from services.common.errors import CallError
from services.common.link import LinkPool
from services.common.tls import TLSConfig
from services.dht.validation import RequestRejected
from services.proto import dht_pb2, dht_pb2_grpc

if TYPE_CHECKING:
    from services.dht.protocol import PeerProtocol

log = logging.getLogger(__name__)

METHODS = ("Ping", "Store", "Find")
REPLIES: dict[str, Any] = {  # method -> its reply message class
    "Ping": dht_pb2.PingResponse,
    "Store": dht_pb2.StoreResponse,
    "Find": dht_pb2.FindResponse,
}


class Transport(ABC):
    name: str = "abstract"

    @abstractmethod
    async def call(self, address: str, method: str, request: Any, timeout: float) -> Any:
        """Send ``request`` to ``dmoe.DHTPeer/<method>`` at ``address``; raise
        :class:`~services.common.errors.CallError` (its ``code`` a ``grpc.StatusCode``)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class GrpcTransport(Transport):
    """Real gRPC with one channel per peer (LRU-capped).

    Every call travels over the peer's link (one long-lived ``DHTPeer/Link`` stream per peer,
    :mod:`services.common.link`), which costs a fraction of a unary call's CPU; every node
    serves ``Link``, so there is no unary path here (the unary methods stay for other
    clients)."""

    name = "grpc"

    def __init__(
        self,
        max_message_bytes: int = 64 * 1024 * 1024,
        max_channels: int = 512,
        tls: TLSConfig | None = None,
    ) -> None:
        # a node serving TLS dials its peers with TLS (same swarm CA); a dropped channel stays
        # open 5 s for the calls still on it (never cancel them: they may be other lookups'
        # calls to the same peer)
        self._channels = ChannelCache(
            dht_pb2_grpc.DHTPeerStub,
            channel_options(max_message_bytes),
            tls,
            grace=5.0,
            max_channels=max_channels,
        )
        self._links = LinkPool(
            lambda address: self._channels.get(address).Link(), self.forget, max_channels
        )

    async def call(self, address: str, method: str, request: Any, timeout: float) -> Any:
        if method not in METHODS:
            raise ValueError(f"unknown peer method {method}")
        try:
            payload = await self._links.call(address, method, request.SerializeToString(), timeout)
            return REPLIES[method].FromString(payload)
        except asyncio.CancelledError:
            # grpc.aio raises CancelledError for a call cancelled under us (peer going away,
            # channel closed); only our own task's cancellation may propagate as such
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise CallError(grpc.StatusCode.CANCELLED, "call cancelled") from None
        except ValueError as exc:  # an address gRPC cannot parse, a reply that does not parse
            self.forget(address)
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    def forget(self, address: str) -> None:
        self._channels.forget(address)

    async def close(self) -> None:
        await self._links.close()
        await self._channels.close()


class InProcessTransport(Transport):
    """Direct calls into nodes living in this process (``register``/``unregister``)."""

    name = "inprocess"

    def __init__(self) -> None:
        self._nodes: dict[str, PeerProtocol] = {}
        self.calls = 0

    def register(self, address: str, protocol: PeerProtocol) -> None:
        self._nodes[address] = protocol

    def unregister(self, address: str) -> None:
        self._nodes.pop(address, None)

    async def call(self, address: str, method: str, request: Any, timeout: float) -> Any:
        self.calls += 1
        protocol = self._nodes.get(address)
        if protocol is None:
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"no node at {address}")
        await asyncio.sleep(0)  # let others run, as a network round trip would
        try:
            return await protocol.handle(method, request, caller_host="127.0.0.1")
        except RequestRejected as exc:
            raise CallError(exc.code, exc.message) from None
