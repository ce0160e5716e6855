"""What the DHT says about the swarm: the announcements and the expert grids, read as hostile input.

:class:`DHTReader` does the DHT half of an explorer round (:mod:`services.explorer.collect`):
the well-known announcement keys (``_dmoe.grids``, ``_dmoe.trainers``) parsed and bounded, the
grids to look at chosen, and each grid walked the way a beam search walks it, one batched get
per dimension. Only owned entries count; a malformed one is skipped and counted
(``dmoe_explorer_rejected_total{reason}``); everything is bounded by :class:`Limits`. Whether
the peers named here answer is :mod:`services.explorer.probing`'s question.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import cast

from services.common.addresses import is_peer_address
from services.common.announcements import (
    GRIDS_KEY,
    PREFIX_RE,
    TRAINERS_KEY,
    GridAnnouncement,
    TrainerAnnouncement,
    parse_grid,
    parse_trainer,
)
from services.common.errors import CallError
from services.common.expert_keys import parse_coordinate, prefix_key
from services.common.rejections import Rejections
from services.dht.client import DHTClient, DHTUnavailable, Found
from services.explorer.limits import Limits
from services.explorer.rows import Grid, Replica

GET_CHUNK = 256  # keys per DHT get
DHT_CONCURRENCY = 8  # DHT gets in flight at once
# what a DHT get raises when the DHT cannot answer (a node refusing past its admission limits
# answers RESOURCE_EXHAUSTED, which the client passes on)
DHT_ERRORS = (DHTUnavailable, ValueError, CallError)


class DHTReader:
    """Reads the swarm's announcements and grids from ``dht``; ``prefixes``: grids to look at
    first (invalid ones dropped), before those announced."""

    def __init__(
        self, dht: DHTClient, prefixes: list[str], limits: Limits, rejections: Rejections
    ) -> None:
        self.dht = dht
        self.prefixes = [p for p in prefixes if PREFIX_RE.match(p)]
        self.limits = limits
        self.rejections = rejections
        self._dht_slots = asyncio.Semaphore(DHT_CONCURRENCY)

    def _reject(self, reason: str, message: str, source: str = "", **fields: object) -> None:
        self.rejections.reject(reason, message, source, **fields)

    # ---------------------------------------------------------------- the grids
    async def get(self, keys: list[str]) -> dict[str, Found]:
        """Many keys, in chunks, concurrently; keys whose chunk failed are missing."""
        chunks = [keys[i : i + GET_CHUNK] for i in range(0, len(keys), GET_CHUNK)]

        async def get(chunk: list[str]) -> dict[str, Found]:
            async with self._dht_slots:
                return cast(dict[str, Found], await self.dht.get(chunk, latest=True))

        answers = await asyncio.gather(*(get(chunk) for chunk in chunks), return_exceptions=True)
        found: dict[str, Found] = {}
        for answer in answers:
            if isinstance(answer, BaseException):
                if not isinstance(answer, DHT_ERRORS):
                    raise answer
                continue
            found.update(answer)
        return found

    def _owned(self, found: Found, key: str) -> list[tuple[bytes, bytes, float, bytes]]:
        """(subkey, value, expiration, owner) of the owned entries of a dictionary."""
        if not isinstance(found, dict):
            return []
        entries = []
        for subkey, values in found.items():
            for v in values:
                if not v.owner:
                    self._reject("unowned", "skipped an unowned entry", key=key[:100])
                    continue
                entries.append((subkey, v.value, v.expiration, v.owner))
        return entries

    async def walk(self, grid: Grid) -> None:
        """The uids under ``grid.prefix`` and the servers declaring each (a beam search's walk)."""
        depth = len(grid.declared_shape) if grid.declared_shape else None
        level = [prefix_key(grid.prefix)]
        for dim in itertools.count():
            if not level or dim >= 8:
                return
            found = await self.get(level)
            following: list[str] = []
            for key in level:
                leaf = depth is not None and dim == depth - 1
                entries = self._owned(found.get(key), key)
                if entries and depth is None and dim > 0:
                    grid.uids.pop(key[:-1], None)  # no declared shape: a uid has no children
                for subkey, value, expiration, owner in entries:
                    coord = parse_coordinate(subkey)
                    if coord is None:
                        self._reject("bad_coordinate", "skipped a non-coordinate subkey",
                                     key=key[:100])  # fmt: skip
                        continue
                    child = f"{key}{coord}"
                    if depth is None or leaf:
                        replica = self._replica(value, owner, expiration)
                        if replica is not None and self._room(grid, child):
                            grid.uids.setdefault(child, []).append(replica)
                    if not leaf and child + "." not in following:
                        if len(following) >= self.limits.max_cells:
                            grid.truncated = True
                            continue
                        following.append(child + ".")
            level = following

    def _room(self, grid: Grid, uid: str) -> bool:
        if uid in grid.uids and len(grid.uids[uid]) < 64:
            return True
        if uid not in grid.uids and len(grid.uids) < self.limits.max_cells:
            return True
        grid.truncated = True
        return False

    def _replica(self, value: bytes, owner: bytes, expiration: float) -> Replica | None:
        try:
            address = value.decode("ascii")
        except UnicodeDecodeError:
            address = ""
        if not is_peer_address(address):
            self._reject("bad_address", "skipped a declaration that is no host:port")
            return None
        return Replica(address, owner, expiration)

    # ---------------------------------------------------------------- announcements
    def grid_announcements(self, found: Found) -> list[tuple[GridAnnouncement, bytes, float]]:
        kept = []
        for subkey, value, expiration, owner in self._owned(found, GRIDS_KEY):
            announcement, problem = parse_grid(subkey, value)
            if announcement is None:
                self._reject(problem, "skipped a grid announcement", reason_detail=problem)
                continue
            kept.append((announcement, owner, expiration))
        kept.sort(key=lambda a: -a[2])
        return kept[: self.limits.max_servers * 4]

    def trainer_announcements(self, found: Found) -> list[tuple[TrainerAnnouncement, bytes, float]]:
        kept: dict[tuple[str, bytes], tuple[TrainerAnnouncement, bytes, float]] = {}
        for subkey, value, expiration, owner in self._owned(found, TRAINERS_KEY):
            announcement, problem = parse_trainer(subkey, value)
            if announcement is None:
                self._reject(problem, "skipped a trainer announcement")
                continue
            slot = (announcement.address, owner)
            if slot not in kept or kept[slot][2] < expiration:
                kept[slot] = (announcement, owner, expiration)
        ordered = sorted(kept.values(), key=lambda a: (a[0].run_id, a[0].address))
        if len(ordered) > self.limits.max_trainers:
            self._reject("over_limit", "more trainers announced than --max-trainers")
        return ordered[: self.limits.max_trainers]

    def choose_grids(self, announced: list[tuple[GridAnnouncement, bytes, float]]) -> list[Grid]:
        shapes: dict[str, Counter[tuple[int, ...]]] = {}
        for announcement, _owner, _exp in announced:
            shapes.setdefault(announcement.prefix, Counter())[announcement.shape] += 1
        by_servers = sorted(shapes, key=lambda p: (-sum(shapes[p].values()), p))
        names = list(dict.fromkeys([*self.prefixes, *by_servers]))
        if len(names) > self.limits.max_grids:
            self._reject("over_limit", "more grids announced than --max-grids")
        grids = []
        for name in names[: self.limits.max_grids]:
            votes = shapes.get(name)
            shape = votes.most_common(1)[0][0] if votes else None
            grids.append(Grid(name, shape))
        return grids
