"""Small helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from typing import Any

from services.dht.config import NodeConfig
from services.dht.server import RunningNode, start_node


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def make_swarm(
    n: int, rng: random.Random, config: NodeConfig | None = None
) -> list[RunningNode]:
    """Real gRPC DHT nodes in this process, each bootstrapped from up to 3 earlier ones."""
    nodes = [await start_node(config)]
    for i in range(1, n):
        peers = [x.address for x in rng.sample(nodes, min(3, i))]
        nodes.append(await start_node(config, initial_peers=peers))
    await asyncio.wait_for(asyncio.gather(*(x.node.joined.wait() for x in nodes)), 60)
    return nodes


@contextlib.asynccontextmanager
async def serve_expert(
    client_bytes: int = 64 * 1024 * 1024, **config: object
) -> AsyncIterator[tuple[Any, Any]]:
    """An in-process expert server (``ExpertConfig(**config)``) and an ``ExpertClient`` for it.

    The expert modules (and torch) are imported here, not with this file: DHT tests share it."""
    from services.expert.client import ExpertClient
    from services.expert.server import ExpertConfig, ExpertServer

    server = await ExpertServer(ExpertConfig(**config)).start()  # type: ignore[arg-type]
    client = ExpertClient(f"127.0.0.1:{server.port}", max_message_bytes=client_bytes)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(0.5)
