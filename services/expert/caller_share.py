"""At most a share of an expert's recent updates from one caller (``--max-caller-share``).

In open training anyone's backward trains the expert: requests that pass every check (finite,
at the honest gradient scale, clipped) can still all push one way. Measured: 60 backwards at
the honest grad_outputs RMS, all in one fixed direction, moved an expert's outputs +60.9 along
it (a random-direction control: -1.1) and no guard fired, because nothing about any single
request is wrong. What can be bounded is how much of an expert's training one caller does: with
``share`` > 0, a backward request is refused (RESOURCE_EXHAUSTED, ``caller_share``) when its
caller already sent ``share`` x ``window`` of the expert's last ``window`` admitted backward
requests. Only admitted requests enter the window, so a refused caller's retries do not push
honest callers out of it.

Callers are keyed by IP (``services.common.limits.peer_key``), the identity a peer cannot
multiply for free. The trade-offs, why it is off by default: processes behind one address
(NAT, a one-host swarm where every trainer reaches the expert from 127.0.0.1) are one caller,
and a swarm with fewer than ``1 / share`` active trainers per expert refuses its own honest
updates once the window fills (a lone trainer gets ``share`` x ``window`` backwards, then only
what others' requests make room for). An attacker with many addresses gets ``share`` per
address. Turn it on where an expert serves many trainers on distinct addresses.
"""

from __future__ import annotations

from collections import Counter, deque

WINDOW = 256


class CallerShare:
    """``admit(caller)``: True (and recorded) unless ``caller`` holds its share of the window."""

    def __init__(self, share: float, window: int = WINDOW) -> None:
        self.share = share
        self.window = window
        self.limit = max(1, int(share * window))
        self._recent: deque[str] = deque()
        self._counts: Counter[str] = Counter()

    def admit(self, caller: str) -> bool:
        if self._counts[caller] >= self.limit:
            return False
        if len(self._recent) == self.window:
            oldest = self._recent.popleft()
            self._counts[oldest] -= 1
            if not self._counts[oldest]:
                del self._counts[oldest]
        self._recent.append(caller)
        self._counts[caller] += 1
        return True

    def held(self, caller: str) -> int:
        """How many of the window's requests ``caller`` sent."""
        return self._counts.get(caller, 0)
