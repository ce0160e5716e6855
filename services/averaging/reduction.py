"""The reducer's side of one part of one round: collect every member's slice, then aggregate.

A member's slice arrives in chunks (at most 1 MiB each). The part is reduced once, when every
member has sent all its chunks or was refused, or when the phase deadline passes; members whose
slice is incomplete then are left out (their chunks are dropped, never half-used). Every chunk
request waits for that one result and gets its own chunk of it back, so all members receive the
same bytes.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from services.averaging.aggregate import Aggregation, aggregate
from services.averaging.wire import roundtrip


class Reduced:
    """A reduced part: the values every member gets, who contributed, the clip radius."""

    __slots__ = ("contributors", "radius", "values")

    def __init__(self, values: np.ndarray, contributors: list[int], radius: float) -> None:
        self.values, self.contributors, self.radius = values, contributors, radius


class Reduction:
    """One part being reduced by this member (its own slice is given at creation)."""

    def __init__(
        self,
        members: int,
        me: int,
        own: np.ndarray,
        own_weight: float,
        chunk: int,
        deadline: float,
        how: Aggregation,
        compression: int,
    ) -> None:
        self.length = len(own)
        self.chunk = chunk
        self.chunks = max(1, -(-self.length // chunk))
        self.how, self.compression = how, compression
        self.inputs = np.empty((members, self.length), dtype=np.float32)
        self.inputs[me] = own
        self.weights = np.zeros(members, dtype=np.float64)
        self.weights[me] = own_weight
        self.received: list[set[int]] = [set() for _ in range(members)]
        self.received[me] = set(range(self.chunks))
        self.refused: set[int] = set()
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[Reduced] = loop.create_future()
        self._timer = loop.call_later(max(0.0, deadline - time.monotonic()), self.finish)
        self._check()

    def bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk
        return start, min(self.length, start + self.chunk)

    def add(self, member: int, chunk: int, values: np.ndarray, weight: float) -> str | None:
        """Store one chunk; a problem (a refusal reason) instead when it cannot be taken."""
        if self.done.done():
            return None  # reduced already (the chunk came late): it gets the result as is
        if member in self.refused:
            return "refused_member"
        got = self.received[member]
        if chunk in got:
            return "duplicate"
        if got and self.weights[member] != weight:
            return "weight"
        start, end = self.bounds(chunk)
        self.inputs[member, start:end] = values
        self.weights[member] = weight
        got.add(chunk)
        self._check()
        return None

    def refuse(self, member: int) -> None:
        """Leave ``member`` out (it sent something invalid): nothing more is waited for."""
        if not self.done.done():
            self.refused.add(member)
            self.received[member] = set()
            self._check()

    def _check(self) -> None:
        if all(len(r) == self.chunks or m in self.refused for m, r in enumerate(self.received)):
            self.finish()

    def finish(self) -> None:
        if self.done.done():
            return
        self._timer.cancel()
        contributors = [m for m, r in enumerate(self.received) if len(r) == self.chunks]
        values, radius = aggregate(self.inputs[contributors], self.weights[contributors], self.how)
        # every member, this one included, ends with exactly what the wire carries
        self.done.set_result(Reduced(roundtrip(values, self.compression), contributors, radius))
        self.inputs = np.empty((0, 0), dtype=np.float32)  # free the members' slices

    def cancel(self) -> None:
        self._timer.cancel()
        if not self.done.done():
            self.done.cancel()
