"""Merge peer calls made in the same event-loop turn to the same peer into one RPC.

A busy node runs many lookups and stores at once (every Put/Get a client sends starts
one), and in a small or dense swarm they keep asking the same peers. Requests for one
destination submitted while the event loop works through its ready callbacks are sent
as one ``Find``/``Store`` call carrying all their keys, flushed at the next turn of the
loop: no timer, so an idle node adds no latency, and a loaded node sends fewer, larger
RPCs (gRPC's fixed cost per call is what a loaded node spends its CPU on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Batch(Generic[T]):
    items: list[T] = field(default_factory=list)
    waiters: list[tuple[int, int, asyncio.Future[Any]]] = field(default_factory=list)


class Coalescer(Generic[K, T, R]):
    """``await submit(dest, items)`` -> the results of ``items``, sent with others to ``dest``.

    ``send(dest, items)`` must return one result per item or raise; an error reaches every
    request of the batch.
    """

    def __init__(
        self,
        send: Callable[[K, list[T]], Awaitable[list[R]]],
        max_items: int,
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self._send = send
        self._max_items = max_items
        self._spawn = spawn
        self._open: dict[K, _Batch[T]] = {}
        self.calls = 0
        self.requests = 0

    async def submit(self, dest: K, items: list[T]) -> list[R]:
        loop = asyncio.get_running_loop()
        batch = self._open.get(dest)
        if batch is None or (batch.items and len(batch.items) + len(items) > self._max_items):
            batch = _Batch()
            self._open[dest] = batch
            loop.call_soon(self._flush, dest, batch)
        future: asyncio.Future[list[R]] = loop.create_future()
        batch.waiters.append((len(batch.items), len(items), future))
        batch.items.extend(items)
        self.requests += 1
        return await future

    def _flush(self, dest: K, batch: _Batch[T]) -> None:
        if self._open.get(dest) is batch:
            del self._open[dest]
        self.calls += 1
        self._spawn(self._run(dest, batch))

    async def _run(self, dest: K, batch: _Batch[T]) -> None:
        try:
            results = await self._send(dest, batch.items)
            if len(results) != len(batch.items):
                raise RuntimeError("batched call returned the wrong number of results")
        except Exception as exc:
            for _, _, future in batch.waiters:
                if not future.done():
                    future.set_exception(exc)
            return
        except asyncio.CancelledError:
            for _, _, future in batch.waiters:
                future.cancel()
            raise
        for start, count, future in batch.waiters:
            if not future.done():
                future.set_result(results[start : start + count])
