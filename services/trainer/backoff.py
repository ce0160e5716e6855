"""Skipping experts that keep failing, so a dead server costs one timeout, not one per step.

An expert that fails ``threshold`` calls in a row is skipped for ``base`` seconds, doubling
with each further consecutive failure up to ``maximum``; one success clears its record. A
server whose calls fail ``address_threshold`` times in a row, over any of its experts, is
skipped as a whole, so a dead server's experts are not discovered dead one by one: the
concurrent calls of a single step usually suffice.

Trade-off: ``threshold`` > 1 keeps a swarm with a few percent of random failures (the paper's
10% setting) from benching healthy experts after every unlucky call, at the price of one more
failed call per expert of a server that really died (which the server-wide rule mostly hides).
The server-wide threshold is higher (5): with 10% random failures three in a row on one server
happen every few hundred calls, and benching every server of a small swarm at once once left
a step with no expert at all; a dead server still fails five calls within a step or two.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Record:
    failures: int = 0
    until: float = 0.0


class Backoff:
    def __init__(
        self,
        base: float = 1.0,
        maximum: float = 60.0,
        threshold: int = 2,
        address_threshold: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base, self.maximum = base, maximum
        self.threshold, self.address_threshold = max(1, threshold), max(1, address_threshold)
        self._clock = clock
        self._uids: dict[str, _Record] = {}
        self._addresses: dict[str, _Record] = {}

    def _bump(self, record: _Record, threshold: int, now: float) -> None:
        record.failures += 1
        if record.failures >= threshold:
            delay = self.base * 2 ** (record.failures - threshold)
            record.until = now + min(self.maximum, delay)

    def is_skipped(self, uid: str, address: str | None = None) -> bool:
        now = self._clock()
        record = self._uids.get(uid)
        if record is not None and record.until > now:
            return True
        server = self._addresses.get(address) if address else None
        return server is not None and server.until > now

    def failure(self, uid: str, address: str | None = None) -> None:
        if self.base <= 0:
            return
        now = self._clock()
        self._bump(self._uids.setdefault(uid, _Record()), self.threshold, now)
        if address:
            self._bump(self._addresses.setdefault(address, _Record()), self.address_threshold, now)

    def success(self, uid: str, address: str | None = None) -> None:
        self._uids.pop(uid, None)
        if address:
            self._addresses.pop(address, None)

    def skipped(self) -> list[str]:
        """Uids and server addresses skipped right now."""
        now = self._clock()
        uids = [uid for uid, r in self._uids.items() if r.until > now]
        return sorted(uids + [a for a, r in self._addresses.items() if r.until > now])
