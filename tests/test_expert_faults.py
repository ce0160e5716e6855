"""Simulated latency (``--simulate-latency-ms``): a fixed delay, or Exp-distributed draws."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from services.expert.faults import with_faults


async def delays(distribution: str, mean_ms: float, calls: int) -> list[float]:
    async def handle(method: str, request: object) -> bytes:
        return b"ok"

    faulty = with_faults(handle, 0.0, mean_ms, seed=1, distribution=distribution)

    async def one() -> float:
        started = time.perf_counter()
        assert await faulty("forward", None) == b"ok"  # type: ignore[arg-type]
        return time.perf_counter() - started

    return await asyncio.gather(*(one() for _ in range(calls)))


def test_fixed_latency_delays_every_reply_alike() -> None:
    measured = asyncio.run(delays("fixed", 40, 50))
    assert min(measured) >= 0.039 and max(measured) - min(measured) < 0.03


def test_exp_latency_draws_a_heavy_tailed_delay_around_the_mean() -> None:
    measured = asyncio.run(delays("exp", 40, 400))
    assert 0.03 < statistics.mean(measured) < 0.08  # the mean of Exp(40 ms), plus overhead
    assert min(measured) < 0.01 and max(measured) > 0.12  # P(< 10 ms) = 22%, P(> 120 ms) = 5%
    assert statistics.median(measured) < statistics.mean(measured)  # median = mean * ln 2


def test_unknown_distribution_is_refused() -> None:
    with pytest.raises(ValueError, match="fixed, exp"):
        with_faults(lambda m, r: None, 0.0, 10, distribution="uniform")  # type: ignore[arg-type]
