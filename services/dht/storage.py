"""Records a node holds: plain values or dictionaries of slots, each with an expiration.

Rules (shared with the merge in :func:`merge_entries`, so a lookup that merges answers
from many nodes agrees with what any one node would keep); a slot is ``(subkey, owner)``,
see :mod:`services.dht.records`:
- a slot is refused when the same slot holds a later expiration; storing one slot never
  touches the others (so one owner's entry never displaces another owner's);
- a plain value replaces a dictionary whose latest expiration is earlier than its own,
  unless the dictionary holds an owned entry: then it is refused, whatever its expiration
  (an unowned write cannot erase what somebody owns);
- an unowned dictionary entry replaces a plain value that expires no later; an owned one
  always does (a squatted key cannot block owned declarations);
- expired entries are never returned and are purged lazily (on read) and in bulk
  (``purge``) through a min-heap of expirations.

An entry may be kept for less than its expiration (``keep_until``): the node does that for
entries from a peer whose clock is off, since the signed expiration itself cannot change.

The capacity counts entries (a slot is an entry), so a dictionary cannot grow a node's
memory without bound. A replica store refuses new entries when full
(:class:`StorageFull`); a cache store (``evict_when_full``) drops the soonest-expiring
entry instead, because a cached copy is only an optimisation.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Iterator

from services.dht.records import Entry, Slot

PLAIN: Slot = (None, b"")


class StorageFull(Exception):
    """No room for another entry."""


def merge_entries(entries: Iterable[Entry], now: float | None = None) -> list[Entry]:
    """Merge answers from several nodes: per slot the later expiration wins, and a plain
    value wins over a dictionary only if it expires after every entry and none is owned."""
    now = time.time() if now is None else now
    best: dict[Slot, Entry] = {}
    for entry in entries:
        if entry.expiration <= now:
            continue
        held = best.get(entry.slot)
        if held is None or entry.expiration > held.expiration:
            best[entry.slot] = entry
    plain = best.pop(PLAIN, None)
    latest = max((e.expiration for e in best.values()), default=float("-inf"))
    if plain is not None and plain.expiration > latest and not any(s[1] for s in best):
        return [plain]
    return sorted(best.values(), key=lambda e: (e.subkey or b"", e.owner))


class Storage:
    """Key id -> record; a record is ``{PLAIN: entry}`` or ``{slot: entry, ...}``.

    Each entry is held with its deadline (its expiration, or an earlier ``keep_until``).
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        evict_when_full: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.clock = clock  # the node's DHT time (its own clock, corrected when skewed)
        self.evict_when_full = evict_when_full
        self._records: dict[int, dict[Slot, tuple[Entry, float]]] = {}
        self._heap: list[tuple[float, int, Slot]] = []
        self._entries = 0
        self.last_stored: dict[int, float] = {}  # key id -> time.monotonic() of the last store

    def __len__(self) -> int:
        """Number of live-or-not-yet-purged entries."""
        return self._entries

    def __contains__(self, key_id: int) -> bool:
        return bool(self.get(key_id))

    def keys(self) -> list[int]:
        return list(self._records)

    def store(self, key_id: int, entry: Entry, keep_until: float | None = None) -> bool:
        """Store unless the rules above refuse it; raises :class:`StorageFull`."""
        now = self.clock()
        deadline = entry.expiration if keep_until is None else min(entry.expiration, keep_until)
        if deadline <= now:
            return False
        record = self._live(key_id, now)
        if record is None:
            self._make_room(1, now)
            self._records[key_id] = {entry.slot: (entry, deadline)}
            self._added(key_id, entry.slot, deadline, 1)
            return True
        latest = max(e.expiration for e, _ in record.values())
        if entry.subkey is None:
            if PLAIN not in record:
                if any(slot[1] for slot in record) or entry.expiration <= latest:
                    return False  # owned entries stay; a tie keeps the richer dictionary
            elif entry.expiration < latest:
                return False
            return self._replace(key_id, record, entry, deadline, now)
        plain = record.get(PLAIN)
        if plain is not None:
            if not entry.owner and plain[0].expiration >= entry.expiration:
                return False
            return self._replace(key_id, record, entry, deadline, now)
        held = record.get(entry.slot)
        if held is not None and held[0].expiration > entry.expiration:
            return False
        if held is None:
            self._make_room(1, now)
        record[entry.slot] = (entry, deadline)
        self._added(key_id, entry.slot, deadline, 0 if held is not None else 1)
        return True

    def _replace(
        self, key_id: int, record: dict[Slot, tuple[Entry, float]], entry: Entry,
        deadline: float, now: float,
    ) -> bool:  # fmt: skip
        """The record becomes ``entry`` alone (a plain value replaced, or replacing)."""
        grown = 1 - len(record)
        if grown > 0:
            self._make_room(grown, now)
        self._records[key_id] = {entry.slot: (entry, deadline)}
        self._added(key_id, entry.slot, deadline, grown)
        return True

    def get(self, key_id: int) -> list[Entry]:
        """Live entries under ``key_id`` (empty when none)."""
        record = self._live(key_id, self.clock())
        return [entry for entry, _ in record.values()] if record else []

    def holds(self, key_id: int, entry: Entry) -> bool:
        """Whether ``entry`` (same slot, expiration and value) is already held."""
        held = self._records.get(key_id, {}).get(entry.slot)
        return held is not None and held[0].expiration == entry.expiration \
            and held[0].value == entry.value  # fmt: skip

    def take(self, key_id: int, slot: Slot, expiration: float) -> tuple[Entry, float] | None:
        """Remove and return (entry, deadline) in ``slot`` of ``key_id`` if it has
        ``expiration``."""
        held = self._records.get(key_id, {}).get(slot)
        if held is None or held[0].expiration != expiration:
            return None
        self._remove(key_id, slot)
        return held

    def items(self) -> Iterator[tuple[int, list[Entry]]]:
        now = self.clock()
        for key_id, record in list(self._records.items()):
            live = [e for e, deadline in record.values() if deadline > now]
            if live:
                yield key_id, live

    def purge(self) -> int:
        """Drop every expired entry; returns how many went."""
        now, before = self.clock(), self._entries
        while self._heap and self._heap[0][0] <= now:
            _, key_id, slot = heapq.heappop(self._heap)
            held = self._records.get(key_id, {}).get(slot)
            if held is not None and held[1] <= now:
                self._remove(key_id, slot)
        return before - self._entries

    def _live(self, key_id: int, now: float) -> dict[Slot, tuple[Entry, float]] | None:
        record = self._records.get(key_id)
        if record is not None:
            for slot in [s for s, (_, deadline) in record.items() if deadline <= now]:
                self._remove(key_id, slot)
            record = self._records.get(key_id)
        return record

    def _added(self, key_id: int, slot: Slot, deadline: float, grown: int) -> None:
        self._entries += grown
        heapq.heappush(self._heap, (deadline, key_id, slot))
        self.last_stored[key_id] = time.monotonic()
        if len(self._heap) > 4 * max(self._entries, 1024):
            self._heap = [
                (deadline, k, s) for k, r in self._records.items() for s, (_, deadline) in r.items()
            ]
            heapq.heapify(self._heap)

    def _make_room(self, needed: int, now: float) -> None:
        if self._entries + needed <= self.max_entries:
            return
        self.purge()
        while self.evict_when_full and self._entries + needed > self.max_entries and self._heap:
            deadline, key_id, slot = heapq.heappop(self._heap)
            held = self._records.get(key_id, {}).get(slot)
            if held is not None and held[1] == deadline:  # else a stale heap item
                self._remove(key_id, slot)
        if self._entries + needed > self.max_entries:
            raise StorageFull(f"storage full: {self._entries} of {self.max_entries} entries")

    def _remove(self, key_id: int, slot: Slot) -> None:
        record = self._records[key_id]
        del record[slot]
        self._entries -= 1
        if not record:
            del self._records[key_id]
            self.last_stored.pop(key_id, None)
