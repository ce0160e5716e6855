"""Simulated failures and latency for simulated swarms (``--simulate-failure-rate``,
``--simulate-latency-ms``).

A wrapper around the servicer's request path, installed only when a flag is set, so a real
server's hot path carries no trace of it. A simulated failure happens before anything else (the
request is not validated, queued or computed: like a server that went away), and the simulated
latency is added after the reply is ready, before it is sent.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from services.expert.errors import unavailable
from services.proto import expert_pb2

Handle = Callable[[str, expert_pb2.ExpertRequest], Awaitable[bytes]]


def with_faults(
    handle: Handle, failure_rate: float, latency_ms: float, seed: int | None = None
) -> Handle:
    """``handle`` failing with UNAVAILABLE with probability ``failure_rate`` and answering
    ``latency_ms`` later; ``handle`` itself when both are 0."""
    if failure_rate <= 0 and latency_ms <= 0:
        return handle
    rng = random.Random(seed)
    latency = latency_ms / 1000.0

    async def faulty(method: str, request: expert_pb2.ExpertRequest) -> bytes:
        if failure_rate > 0 and rng.random() < failure_rate:
            raise unavailable("simulated failure")
        reply = await handle(method, request)
        if latency > 0:
            await asyncio.sleep(latency)
        return reply

    return faulty
