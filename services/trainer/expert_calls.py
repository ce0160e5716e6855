"""Calling many experts at once and deciding when to stop waiting.

A mixture layer sends one request per chosen expert (carrying the rows of every sample that
chose it). Waiting for all of them would make the slowest server in the swarm set the pace,
and a dead one would stall training until its timeout. The policy, from Learning@home:

- wait until every sample has ``k_min`` answers (or has nothing left to wait for),
- then wait at most ``timeout_after_k_min`` more for stragglers,
- never past ``timeout`` in total; whatever is still running then is cancelled.

Results come back per call as :class:`CallOutcome` so the caller builds the answered mask.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from services.common.errors import CallError

OK, TIMEOUT, ERROR, ANOMALY = "ok", "timeout", "error", "anomaly"


@dataclass
class CallOutcome:
    """What one expert call gave: tensors, or the reason it is dropped."""

    tensors: list[torch.Tensor] | None
    reason: str  # ok | timeout | error | anomaly
    seconds: float
    detail: str = ""
    code: str = field(default="")

    @property
    def ok(self) -> bool:
        return self.reason == OK


# judge(call index, tensors) -> '' (usable) or what is wrong (answer_check.py)
Judge = Callable[[int, list[torch.Tensor]], str]


def classify(exc: BaseException) -> tuple[str, str, str]:
    """(reason, gRPC code name, detail) of a failed call."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return TIMEOUT, "DEADLINE_EXCEEDED", "timed out"
    if isinstance(exc, CallError):
        reason = TIMEOUT if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED else ERROR
        return reason, exc.code.name, exc.message
    return ERROR, type(exc).__name__, str(exc)


async def call_many(
    calls: Sequence[Callable[[], Awaitable[list[torch.Tensor]]]],
    rows: Sequence[torch.Tensor],
    num_samples: int,
    *,
    k_min: int | np.ndarray,
    timeout: float,
    timeout_after_k_min: float,
    judge: Judge | None = None,
) -> list[CallOutcome]:
    """Run every ``calls[i]()`` at once; ``rows[i]`` are the sample indices call ``i`` serves.

    ``k_min`` is one number or one per sample. ``judge`` (None: trust every answer) turns an
    answer it objects to into an ``anomaly`` outcome: the call counts as failed.

    Returns one outcome per call, in order. Late calls are cancelled and reported as timeouts.
    """
    started = time.perf_counter()
    outcomes: list[CallOutcome | None] = [None] * len(calls)
    if not calls:
        return []
    answered = np.zeros(num_samples, dtype=np.int64)
    pending = np.zeros(num_samples, dtype=np.int64)
    row_arrays = [r.cpu().numpy() for r in rows]
    for r in row_arrays:
        np.add.at(pending, r, 1)

    tasks = {asyncio.ensure_future(call()): i for i, call in enumerate(calls)}
    deadline = started + timeout
    settled = False
    try:
        while tasks:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            done, _ = await asyncio.wait(
                tasks.keys(), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                i = tasks.pop(task)
                elapsed = time.perf_counter() - started
                r = row_arrays[i]
                np.subtract.at(pending, r, 1)
                exc = task.exception()
                if exc is not None:
                    reason, code, detail = classify(exc)
                    outcomes[i] = CallOutcome(None, reason, elapsed, detail, code)
                    continue
                tensors = task.result()
                problem = judge(i, tensors) if judge is not None else ""
                if problem:
                    outcomes[i] = CallOutcome(None, ANOMALY, elapsed, problem)
                    continue
                outcomes[i] = CallOutcome(tensors, OK, elapsed)
                np.add.at(answered, r, 1)
            if not settled and bool(np.all((answered >= k_min) | (pending == 0))):
                settled = True
                deadline = min(deadline, time.perf_counter() + max(0.0, timeout_after_k_min))
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - started
    for i in tasks.values():
        outcomes[i] = CallOutcome(None, TIMEOUT, elapsed, "no answer in time", "DEADLINE_EXCEEDED")
    return [o for o in outcomes if o is not None]


def remaining_timeout(timeout: float) -> float:
    """gRPC deadlines must be finite and positive."""
    return timeout if math.isfinite(timeout) and timeout > 0 else 3600.0
