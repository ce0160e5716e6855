"""Small helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import random
import socket

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
