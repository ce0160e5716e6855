"""Start one DHT node behind the common gRPC server (used by ``__main__``, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from services.common.identity import Identity
from services.common.limits import ServerLimits
from services.common.rejections import Rejections
from services.common.server import RunningServer, start_server
from services.common.tls import TLSConfig
from services.dht.config import NodeConfig
from services.dht.metrics import NodeMetrics
from services.dht.node import DHTNode
from services.dht.peer_servicer import PeerServicer
from services.dht.service import DHTServicer
from services.dht.transport import GrpcTransport
from services.proto import dht_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class RunningNode:
    node: DHTNode
    server: RunningServer
    address: str
    _serving: asyncio.Task[Any] | None = field(default=None, repr=False)

    async def stop(self, grace: float = 1.0) -> None:
        """NOT_SERVING, stop the node's background work, drain calls, close channels."""
        if self._serving is not None:
            self._serving.cancel()
        self.node.stopping = True
        await self.server.set_serving(False)
        await self.node.stop()
        await self.server.stop(grace)
        await self.node.transport.close()


async def start_node(
    config: NodeConfig | None = None,
    *,
    initial_peers: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 0,
    announce_host: str = "127.0.0.1",
    metrics_port: int | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    identity: Identity | None = None,
    trusted: frozenset[bytes] | None = None,
    tls: TLSConfig | None = None,
    limits: ServerLimits | None = None,
    state_file: str | Path | None = None,
) -> RunningNode:
    """Serve ``dmoe.DHTPeer`` and ``dmoe.DHT`` on one port; health turns SERVING once joined.

    ``identity``: the node's key (its id is the key's SHA-1); a fresh one when None.
    ``trusted``: store only entries owned by these public keys (a private swarm).
    ``state_file``: the routing table's contacts, read at start and written at stop, so a
    restarted node rejoins the swarm it knew even without initial peers.
    """
    config = config or NodeConfig()
    transport = GrpcTransport(max_message_bytes, tls=tls)  # serving TLS: dial peers with it
    holder: dict[str, Any] = {}

    def register(server: grpc.aio.Server) -> list[str]:
        dht_pb2_grpc.add_DHTPeerServicer_to_server(holder["peer"], server)
        dht_pb2_grpc.add_DHTServicer_to_server(holder["service"], server)
        return ["dmoe.DHTPeer", "dmoe.DHT"]

    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    node = DHTNode(
        transport,
        config,
        identity=identity,
        metrics=metrics,
        trusted=trusted,
        rejections=Rejections.of("dht", registry, log),
    )
    holder["node"] = node
    holder["peer"] = peer = PeerServicer(node.protocol)
    holder["service"] = service = DHTServicer(node)
    metrics.bind(node)
    running = await start_server(
        "dht",
        register,
        host=host,
        port=port,
        metrics_port=metrics_port,
        max_message_bytes=max_message_bytes,
        registry=registry,
        tls=tls,
        limits=limits,
        links=[peer.link, service.link],
    )
    node.address = f"{announce_host}:{running.port}"
    await node.start(initial_peers, Path(state_file) if state_file else None)

    async def serve_when_joined() -> None:
        await node.joined.wait()
        await running.set_serving(True)

    task = asyncio.create_task(serve_when_joined())
    if node.joined.is_set():
        await task
    return RunningNode(node, running, node.address, task)
