"""Simulated latency (``--simulate-latency-ms``): a fixed delay, or Exp-distributed draws."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time

import pytest

from services.expert.faults import latency_sampler, with_faults

SEED = 1


async def delays(distribution: str, mean_ms: float, calls: int) -> list[float]:
    """How late each of ``calls`` concurrent replies came (seconds)."""

    async def handle(method: str, request: object, peer: str) -> bytes:
        return b"ok"

    faulty = with_faults(handle, 0.0, mean_ms, seed=SEED, distribution=distribution)

    async def one() -> float:
        started = time.perf_counter()
        assert await faulty("forward", None, "ipv4:127.0.0.1:1") == b"ok"  # type: ignore[arg-type]
        return time.perf_counter() - started

    return await asyncio.gather(*(one() for _ in range(calls)))


def draws(distribution: str, mean_ms: float, n: int) -> list[float]:
    sample = latency_sampler(distribution, mean_ms, random.Random(SEED))
    return [sample() for _ in range(n)]


def at_least(measured: list[float], drawn: list[float]) -> bool:
    """Every reply was late by at least its draw: sorted, each measured delay is at least the
    draw of the same rank (a loaded machine only adds lateness, so this cannot flake)."""
    return all(m >= d - 0.001 for m, d in zip(sorted(measured), sorted(drawn), strict=True))


def test_fixed_latency_delays_every_reply_alike() -> None:
    assert draws("fixed", 40, 100) == [0.04] * 100
    assert at_least(asyncio.run(delays("fixed", 40, 50)), [0.04] * 50)


def test_exp_latency_draws_a_heavy_tailed_delay_around_the_mean() -> None:
    drawn = draws("exp", 40, 20_000)
    assert 0.038 < statistics.mean(drawn) < 0.042
    assert 0.20 < sum(d < 0.010 for d in drawn) / len(drawn) < 0.24  # 1 - e^-1/4 = 22%
    assert 0.04 < sum(d > 0.120 for d in drawn) / len(drawn) < 0.06  # e^-3 = 5%
    assert abs(statistics.median(drawn) / statistics.mean(drawn) - math.log(2)) < 0.03
    # the server's replies are late by those draws (the tail included)
    assert at_least(asyncio.run(delays("exp", 40, 400)), draws("exp", 40, 400))


def test_unknown_distribution_is_refused() -> None:
    with pytest.raises(ValueError, match="fixed, exp"):
        with_faults(lambda m, r: None, 0.0, 10, distribution="uniform")  # type: ignore[arg-type]
