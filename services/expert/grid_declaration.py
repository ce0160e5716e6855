"""The expert server's grid announcement: which grids it hosts experts of, their shape, and a
few figures about the server, under the well-known key ``_dmoe.grids``
(:mod:`services.common.announcements`), renewed with the expert declarations.

Its purpose is discovery: a volunteer's explorer (``services/explorer``) learns every grid
prefix and its shape from here without flags. The figures (queue, samples/s) are the
server's own claims, shown as such; the explorer checks reachability itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from services import __version__
from services.common.announcements import GRIDS_KEY, GridAnnouncement, parse_shape
from services.common.expert_keys import Item, split_uid
from services.expert import uid as uids


def grid_shapes(patterns: Iterable[str], hosted: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Per grid prefix, the shape the patterns describe: per dimension the largest stop
    (``ffn.[0:4].[2:8]`` -> ``(4, 8)``), widened to cover the uids hosted. A prefix whose
    patterns disagree on the number of dimensions keeps the first."""
    shapes: dict[str, list[int]] = {}
    for pattern in patterns:
        name, ranges = uids.parse_pattern(pattern)
        stops = [r.stop for r in ranges]
        held = shapes.setdefault(name, stops)
        if len(held) == len(stops):
            shapes[name] = [max(a, b) for a, b in zip(held, stops, strict=True)]
    for uid in hosted:
        name, coords = split_uid(uid)
        known = shapes.get(name)
        if known is not None and len(known) == len(coords):
            shapes[name] = [max(a, c + 1) for a, c in zip(known, coords, strict=True)]
    return {name: shape for name, s in shapes.items() if (shape := parse_shape(s)) is not None}


class GridAnnouncer:
    """Builds the ``_dmoe.grids`` entries of one server each round (see :meth:`items`).

    ``queued()`` gives the samples waiting in the server's queues and ``processed()`` the
    samples processed so far; the rate announced is over the time since the last round.
    """

    def __init__(
        self,
        patterns: Iterable[str],
        hosted: list[str],
        address: str,
        *,
        tls: bool,
        expert_cls: str,
        max_batch_size: int,
        max_queue_samples: int,
        queued: Callable[[], int],
        processed: Callable[[], float],
    ) -> None:
        self.shapes = grid_shapes(patterns, hosted)
        names = [split_uid(u)[0] for u in hosted]
        self.per_grid = {name: names.count(name) for name in self.shapes}
        self.address = address
        self.tls = tls
        self.expert_cls = expert_cls
        self.max_batch_size = max_batch_size
        self.max_queue_samples = max_queue_samples
        self._queued = queued
        self._processed = processed
        self._last: tuple[float, float] | None = None

    def _rate(self) -> float | None:
        now, total = time.monotonic(), float(self._processed())
        last, self._last = self._last, (now, total)
        if last is None or now <= last[0]:
            return None
        return max(0.0, (total - last[1]) / (now - last[0]))

    def items(self, expiration: float) -> list[Item]:
        rate, queued = self._rate(), int(self._queued())
        return [
            (
                GRIDS_KEY,
                name,
                GridAnnouncement(
                    prefix=name,
                    shape=shape,
                    address=self.address,
                    version=__version__,
                    tls=self.tls,
                    experts=self.per_grid[name],
                    expert_cls=self.expert_cls,
                    max_batch_size=self.max_batch_size,
                    max_queue_samples=self.max_queue_samples,
                    queued=queued,
                    samples_per_s=rate,
                ).encode(),
                expiration,
            )
            for name, shape in self.shapes.items()
        ]
