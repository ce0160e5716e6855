"""Records a node holds: plain values or dictionaries of subkeys, each with an expiration.

Rules (shared with the merge in :func:`merge_entries`, so a lookup that merges answers
from many nodes agrees with what any one node would keep):
- a plain value replaces a record whose latest expiration is not later than its own;
- a subkey is refused when the same subkey (or a plain value under the key) has a later
  expiration; storing one subkey never touches the others;
- expired entries are never returned and are purged lazily (on read) and in bulk
  (``purge``) through a min-heap of expirations.

The capacity counts entries (a subkey is an entry), so a dictionary cannot grow a node's
memory without bound. A replica store refuses new entries when full
(:class:`StorageFull`); a cache store (``evict_when_full``) drops the soonest-expiring
entry instead, because a cached copy is only an optimisation.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Iterator
from typing import NamedTuple


class Entry(NamedTuple):
    """One value: ``subkey`` is None for a plain value."""

    subkey: bytes | None
    value: bytes
    expiration: float


class StorageFull(Exception):
    """No room for another entry."""


def merge_entries(entries: Iterable[Entry], now: float | None = None) -> list[Entry]:
    """Merge answers from several nodes: per subkey the later expiration wins, and a plain
    value wins over a dictionary only if it expires after every subkey."""
    now = time.time() if now is None else now
    best: dict[bytes | None, Entry] = {}
    for entry in entries:
        if entry.expiration <= now:
            continue
        held = best.get(entry.subkey)
        if held is None or entry.expiration > held.expiration:
            best[entry.subkey] = entry
    plain = best.pop(None, None)
    latest_subkey = max((e.expiration for e in best.values()), default=float("-inf"))
    if plain is not None and plain.expiration > latest_subkey:
        return [plain]
    return sorted(best.values(), key=lambda e: e.subkey or b"")


class Storage:
    """Key id -> record; a record is ``{None: plain}`` or ``{subkey: entry, ...}``."""

    def __init__(self, max_entries: int = 100_000, evict_when_full: bool = False) -> None:
        self.max_entries = max_entries
        self.evict_when_full = evict_when_full
        self._records: dict[int, dict[bytes | None, Entry]] = {}
        self._heap: list[tuple[float, int, bytes | None]] = []
        self._entries = 0
        self.last_stored: dict[int, float] = {}  # key id -> time.monotonic() of the last store

    def __len__(self) -> int:
        """Number of live-or-not-yet-purged entries."""
        return self._entries

    def __contains__(self, key_id: int) -> bool:
        return bool(self.get(key_id))

    def keys(self) -> list[int]:
        return list(self._records)

    def store(self, key_id: int, subkey: bytes | None, value: bytes, expiration: float) -> bool:
        """Store unless a later expiration is held; raises :class:`StorageFull`."""
        now = time.time()
        if expiration <= now:
            return False
        record = self._records.get(key_id)
        if record is not None:
            self._drop_expired(key_id, record, now)
            record = self._records.get(key_id)
        entry = Entry(subkey, value, expiration)
        if record is None:
            self._make_room(1, now)
            self._records[key_id] = {subkey: entry}
            self._added(key_id, entry, 1)
            return True
        if subkey is None:
            if expiration < max(e.expiration for e in record.values()):
                return False
            if None not in record and expiration == max(e.expiration for e in record.values()):
                return False  # a tie keeps the dictionary: it has more information
            grown = 1 - len(record)
            if grown > 0:
                self._make_room(grown, now)
            self._records[key_id] = {None: entry}
            self._added(key_id, entry, grown)
            return True
        plain = record.get(None)
        if plain is not None:
            if plain.expiration >= expiration:
                return False
            self._records[key_id] = {subkey: entry}
            self._added(key_id, entry, 0)
            return True
        held = record.get(subkey)
        if held is not None and held.expiration > expiration:
            return False
        if held is None:
            self._make_room(1, now)
        record[subkey] = entry
        self._added(key_id, entry, 0 if held is not None else 1)
        return True

    def get(self, key_id: int) -> list[Entry]:
        """Live entries under ``key_id`` (empty when none)."""
        record = self._records.get(key_id)
        if record is None:
            return []
        self._drop_expired(key_id, record, time.time())
        record = self._records.get(key_id)
        return list(record.values()) if record else []

    def take(self, key_id: int, subkey: bytes | None, expiration: float) -> Entry | None:
        """Remove and return the entry ``subkey`` of ``key_id`` if it has ``expiration``."""
        held = self._records.get(key_id, {}).get(subkey)
        if held is None or held.expiration != expiration:
            return None
        self._remove(key_id, subkey)
        return held

    def items(self) -> Iterator[tuple[int, list[Entry]]]:
        now = time.time()
        for key_id, record in list(self._records.items()):
            live = [e for e in record.values() if e.expiration > now]
            if live:
                yield key_id, live

    def purge(self) -> int:
        """Drop every expired entry; returns how many went."""
        now, before = time.time(), self._entries
        while self._heap and self._heap[0][0] <= now:
            _, key_id, subkey = heapq.heappop(self._heap)
            held = self._records.get(key_id, {}).get(subkey)
            if held is not None and held.expiration <= now:
                self._remove(key_id, subkey)
        return before - self._entries

    def _added(self, key_id: int, entry: Entry, grown: int) -> None:
        self._entries += grown
        heapq.heappush(self._heap, (entry.expiration, key_id, entry.subkey))
        self.last_stored[key_id] = time.monotonic()
        if len(self._heap) > 4 * max(self._entries, 1024):
            self._heap = [
                (e.expiration, k, e.subkey) for k, r in self._records.items() for e in r.values()
            ]
            heapq.heapify(self._heap)

    def _make_room(self, needed: int, now: float) -> None:
        if self._entries + needed <= self.max_entries:
            return
        self.purge()
        while self.evict_when_full and self._entries + needed > self.max_entries and self._heap:
            expiration, key_id, subkey = heapq.heappop(self._heap)
            held = self._records.get(key_id, {}).get(subkey)
            if held is not None and held.expiration == expiration:  # else a stale heap item
                self._remove(key_id, subkey)
        if self._entries + needed > self.max_entries:
            raise StorageFull(f"storage full: {self._entries} of {self.max_entries} entries")

    def _drop_expired(self, key_id: int, record: dict[bytes | None, Entry], now: float) -> None:
        for subkey in [s for s, e in record.items() if e.expiration <= now]:
            self._remove(key_id, subkey)

    def _remove(self, key_id: int, subkey: bytes | None) -> None:
        record = self._records[key_id]
        del record[subkey]
        self._entries -= 1
        if not record:
            del self._records[key_id]
            self.last_stored.pop(key_id, None)
