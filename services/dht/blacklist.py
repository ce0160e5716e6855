"""Peers that failed recently, banned for a while so lookups stop asking them.

A failing address is banned for ``base * 2^(failures-1)`` seconds, capped at ``maximum``;
any call *from* that peer (once it proved its id) clears the ban. Failure counts are
forgotten once a ban has been over for ``maximum`` seconds, so the table stays bounded by
the peers that failed recently.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Blacklist:
    def __init__(
        self, base: float, maximum: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.base, self.maximum = base, maximum
        self.clock = clock
        self._until: dict[str, tuple[float, int]] = {}

    def fail(self, address: str) -> None:
        _, failures = self._until.get(address, (0.0, 0))
        failures += 1
        ban = min(self.base * 2 ** (failures - 1), self.maximum)
        self._until[address] = (self.clock() + ban, failures)

    def clear(self, address: str) -> None:
        self._until.pop(address, None)

    def blocked(self, address: str) -> bool:
        held = self._until.get(address)
        return held is not None and self.clock() < held[0]

    def __len__(self) -> int:
        now = self.clock()
        for address in [a for a, (until, n) in self._until.items() if until < now - self.maximum]:
            del self._until[address]  # long expired: forget the failure count too
        return sum(1 for until, _ in self._until.values() if until > now)
