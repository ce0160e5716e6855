"""Simulated failures and latency for simulated swarms (``--simulate-failure-rate``,
``--simulate-latency-ms``).

A wrapper around the servicer's request path, installed only when a flag is set, so a real
server's hot path carries no trace of it. A simulated failure happens before anything else (the
request is not validated, queued or computed: like a server that went away), and the simulated
latency is added after the reply is ready, before it is sent.

The latency is either ``fixed`` (every reply exactly ``latency_ms`` late: a clean floor for
throughput measurements) or ``exp``: drawn per call from an exponential distribution with mean
``latency_ms``, as in the Learning@home paper's convergence experiments (sec 4.2), where the
heavy tail is what makes trainers' round trips, and so the staleness of their updates, vary.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from services.expert.errors import unavailable
from services.proto import expert_pb2

# (method, request, the caller's context.peer()) -> serialized reply
Handle = Callable[[str, expert_pb2.ExpertRequest, str], Awaitable[bytes]]


LATENCY_DISTRIBUTIONS = ("fixed", "exp")


def latency_sampler(
    distribution: str, latency_ms: float, rng: random.Random
) -> Callable[[], float]:
    """Draws of the simulated delay, in seconds (``fixed``: always ``latency_ms``)."""
    if distribution not in LATENCY_DISTRIBUTIONS:
        choices = ", ".join(LATENCY_DISTRIBUTIONS)
        raise ValueError(f"latency distribution {distribution!r} is not one of {choices}")
    mean = latency_ms / 1000.0
    if distribution == "exp":
        return lambda: rng.expovariate(1.0 / mean)
    return lambda: mean


def with_faults(
    handle: Handle,
    failure_rate: float,
    latency_ms: float,
    seed: int | None = None,
    distribution: str = "fixed",
) -> Handle:
    """``handle`` failing with UNAVAILABLE with probability ``failure_rate`` and answering
    ``latency_ms`` later (``distribution`` ``exp``: a draw with that mean); ``handle`` itself
    when both are 0."""
    rng = random.Random(seed)
    latency = latency_sampler(distribution, latency_ms, rng)
    if failure_rate <= 0 and latency_ms <= 0:
        return handle

    async def faulty(method: str, request: expert_pb2.ExpertRequest, peer: str) -> bytes:
        if failure_rate > 0 and rng.random() < failure_rate:
            raise unavailable("simulated failure")
        reply = await handle(method, request, peer)
        if latency_ms > 0:
            await asyncio.sleep(latency())
        return reply

    return faulty
