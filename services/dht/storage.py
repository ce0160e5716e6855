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

The capacity counts entries (a slot is an entry) and bytes, so a dictionary cannot grow a
node's memory without bound. A replica store refuses new entries when full
(:class:`StorageFull`); a cache store (``evict_when_full``) drops the soonest-expiring
entry instead, because a cached copy is only an optimisation.

Quotas, so that one address cannot fill a node and lock out everybody's declarations:
- each entry is charged to its ``source`` (the IP it came from; '' for this node's own
  writes, which are not limited): one source holds at most ``max_per_source`` entries and
  ``max_bytes_per_source`` bytes;
- unowned entries (which cost nothing to make) hold at most ``max_unowned`` places;
- when full, an owned entry evicts the soonest-expiring *unowned* entry: spam never keeps
  out a signed declaration. Owned entries never evict each other (their owners' quotas and the
  per-source quota bound what one party holds).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

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


class Held(NamedTuple):
    """An entry as held: kept until ``deadline``, charged to ``source`` for ``size`` bytes."""

    entry: Entry
    deadline: float
    source: str
    size: int


def entry_size(entry: Entry) -> int:
    """What an entry is charged for: its bytes and about what holding it costs besides."""
    return (
        len(entry.value) + len(entry.subkey or b"") + len(entry.owner) + len(entry.signature) + 200
    )


class Storage:
    """Key id -> record; a record is ``{PLAIN: held}`` or ``{slot: held, ...}``.

    Each entry is held with its deadline (its expiration, or an earlier ``keep_until``).
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        evict_when_full: bool = False,
        clock: Callable[[], float] = time.time,
        *,
        max_bytes: int = 0,
        max_per_source: int = 0,
        max_bytes_per_source: int = 0,
        max_unowned: int = 0,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes  # 0: no limit (the same for the quotas below)
        self.max_per_source = max_per_source
        self.max_bytes_per_source = max_bytes_per_source
        self.max_unowned = max_unowned
        self.clock = clock  # the node's DHT time (its own clock, corrected when skewed)
        self.evict_when_full = evict_when_full
        self._records: dict[int, dict[Slot, Held]] = {}
        self._heap: list[tuple[float, int, Slot]] = []
        self._unowned_heap: list[tuple[float, int, Slot]] = []
        self._unowned_by_source: dict[str, list[tuple[float, int, Slot]]] = {}
        self._entries = 0
        self._bytes = 0
        self._unowned = 0
        self._sources: dict[str, list[int]] = {}  # source -> [entries, bytes]
        self.last_stored: dict[int, float] = {}  # key id -> time.monotonic() of the last store

    def __len__(self) -> int:
        """Number of live-or-not-yet-purged entries."""
        return self._entries

    @property
    def bytes(self) -> int:
        return self._bytes

    def __contains__(self, key_id: int) -> bool:
        return bool(self.get(key_id))

    def keys(self) -> list[int]:
        return list(self._records)

    def held_by(self, source: str) -> tuple[int, int]:
        """(entries, bytes) charged to ``source``."""
        used = self._sources.get(source)
        return (used[0], used[1]) if used else (0, 0)

    def store(
        self, key_id: int, entry: Entry, keep_until: float | None = None, source: str = ""
    ) -> bool:
        """Store unless the rules above refuse it; raises :class:`StorageFull` when there is
        no room (or ``source`` is over its quota)."""
        now = self.clock()
        deadline = entry.expiration if keep_until is None else min(entry.expiration, keep_until)
        if deadline <= now:
            return False
        replaced = self._replaced(key_id, entry, now)
        if replaced is None:
            return False
        if replaced == [entry.slot] and self.holds(key_id, entry):
            # the same entry again (a republish, a hand-off): whoever stored it first pays
            source = self._records[key_id][entry.slot].source
        held = Held(entry, deadline, source, entry_size(entry))
        self._make_room(key_id, held, replaced, now)
        record = self._records.get(key_id)
        for slot in replaced:
            if record is not None and slot in record:
                self._remove(key_id, slot)
        record = self._records.setdefault(key_id, {})
        record[entry.slot] = held
        self._added(key_id, held)
        return True

    def _replaced(self, key_id: int, entry: Entry, now: float) -> list[Slot] | None:
        """The slots storing ``entry`` removes (None: refused by the rules)."""
        record = self._live(key_id, now)
        if record is None:
            return []
        latest = max(h.entry.expiration for h in record.values())
        if entry.subkey is None:
            if PLAIN not in record:
                if any(slot[1] for slot in record) or entry.expiration <= latest:
                    return None  # owned entries stay; a tie keeps the richer dictionary
            elif entry.expiration < latest:
                return None
            return list(record)  # the record becomes the plain value alone
        plain = record.get(PLAIN)
        if plain is not None:
            if not entry.owner and plain.entry.expiration >= entry.expiration:
                return None
            return list(record)
        held = record.get(entry.slot)
        if held is not None and held.entry.expiration > entry.expiration:
            return None
        return [entry.slot] if held is not None else []

    def holds(self, key_id: int, entry: Entry) -> bool:
        """Whether ``entry`` (same slot, expiration and value) is already held."""
        held = self._records.get(key_id, {}).get(entry.slot)
        return held is not None and held.entry.expiration == entry.expiration \
            and held.entry.value == entry.value  # fmt: skip

    def get(self, key_id: int) -> list[Entry]:
        """Live entries under ``key_id`` (empty when none)."""
        record = self._live(key_id, self.clock())
        return [held.entry for held in record.values()] if record else []

    def take(self, key_id: int, slot: Slot, expiration: float) -> tuple[Entry, float] | None:
        """Remove and return (entry, deadline) in ``slot`` of ``key_id`` if it has
        ``expiration``."""
        held = self._records.get(key_id, {}).get(slot)
        if held is None or held.entry.expiration != expiration:
            return None
        self._remove(key_id, slot)
        return held.entry, held.deadline

    def items(self) -> Iterator[tuple[int, list[Entry]]]:
        now = self.clock()
        for key_id, record in list(self._records.items()):
            live = [h.entry for h in record.values() if h.deadline > now]
            if live:
                yield key_id, live

    def purge(self) -> int:
        """Drop every expired entry; returns how many went."""
        now, before = self.clock(), self._entries
        while self._heap and self._heap[0][0] <= now:
            _, key_id, slot = heapq.heappop(self._heap)
            held = self._records.get(key_id, {}).get(slot)
            if held is not None and held.deadline <= now:
                self._remove(key_id, slot)
        return before - self._entries

    def _live(self, key_id: int, now: float) -> dict[Slot, Held] | None:
        record = self._records.get(key_id)
        if record is not None:
            for slot in [s for s, h in record.items() if h.deadline <= now]:
                self._remove(key_id, slot)
            record = self._records.get(key_id)
        return record

    def _added(self, key_id: int, held: Held) -> None:
        slot = held.entry.slot
        self._entries += 1
        self._bytes += held.size
        used = self._sources.get(held.source)
        if used is None:
            used = self._sources[held.source] = [0, 0]
        used[0] += 1
        used[1] += held.size
        heapq.heappush(self._heap, (held.deadline, key_id, slot))
        if not held.entry.owner:
            self._unowned += 1
            heapq.heappush(self._unowned_heap, (held.deadline, key_id, slot))
            mine = self._unowned_by_source.setdefault(held.source, [])
            heapq.heappush(mine, (held.deadline, key_id, slot))
        self.last_stored[key_id] = time.monotonic()
        if len(self._heap) > 4 * max(self._entries, 1024):
            self._heap = [
                (h.deadline, k, s) for k, r in self._records.items() for s, h in r.items()
            ]
            heapq.heapify(self._heap)
            self._unowned_heap = [
                (h.deadline, k, s)
                for k, r in self._records.items()
                for s, h in r.items()
                if not h.entry.owner
            ]
            heapq.heapify(self._unowned_heap)
            self._unowned_by_source = {}
            for deadline, k, slot in self._unowned_heap:
                source = self._records[k][slot].source
                self._unowned_by_source.setdefault(source, []).append((deadline, k, slot))
            for heap in self._unowned_by_source.values():
                heapq.heapify(heap)

    def _over(self, key_id: int, held: Held, replaced: list[Slot]) -> str:
        """Which limit storing ``held`` (removing ``replaced``) would break ('' when none)."""
        record = self._records.get(key_id, {})
        gone = [record[s] for s in replaced if s in record]
        entries = self._entries + 1 - len(gone)
        size = self._bytes + held.size - sum(h.size for h in gone)
        if held.source:
            mine = [h for h in gone if h.source == held.source]
            used, used_bytes = self.held_by(held.source)
            if self.max_per_source and used + 1 - len(mine) > self.max_per_source:
                return "source"
            if (
                self.max_bytes_per_source
                and used_bytes + held.size - sum(h.size for h in mine) > self.max_bytes_per_source
            ):
                return "source"
        if not held.entry.owner and self.max_unowned:
            unowned = self._unowned + 1 - sum(1 for h in gone if not h.entry.owner)
            if unowned > self.max_unowned:
                return "unowned"
        if entries > self.max_entries or (self.max_bytes and size > self.max_bytes):
            return "full"
        return ""

    def _make_room(self, key_id: int, held: Held, replaced: list[Slot], now: float) -> None:
        over = self._over(key_id, held, replaced)
        if not over:
            return
        self.purge()
        over = self._over(key_id, held, replaced)
        while over == "full" and self.evict_when_full and self._heap:
            self._evict(self._heap)
            over = self._over(key_id, held, replaced)
        while over == "full" and held.entry.owner and self._unowned_heap:
            self._evict(self._unowned_heap)  # spam never keeps a signed entry out
            over = self._over(key_id, held, replaced)
        mine = self._unowned_by_source.get(held.source)
        while over == "source" and held.entry.owner and mine:
            self._evict(mine)  # nor does spam relayed by the same source
            over = self._over(key_id, held, replaced)
        if over:
            reason = {
                "source": f"{held.source} holds its quota ({self.max_per_source} entries, "
                f"{self.max_bytes_per_source} bytes)",
                "unowned": f"unowned entries hold their share ({self.max_unowned})",
                "full": f"storage full: {self._entries} of {self.max_entries} entries, "
                f"{self._bytes} of {self.max_bytes or 'unlimited'} bytes",
            }[over]
            raise StorageFull(reason)

    def _evict(self, heap: list[tuple[float, int, Slot]]) -> None:
        deadline, key_id, slot = heapq.heappop(heap)
        held = self._records.get(key_id, {}).get(slot)
        if held is not None and held.deadline == deadline:  # else a stale heap item
            self._remove(key_id, slot)

    def _remove(self, key_id: int, slot: Slot) -> None:
        record = self._records[key_id]
        held = record.pop(slot)
        self._entries -= 1
        self._bytes -= held.size
        used = self._sources[held.source]
        used[0] -= 1
        used[1] -= held.size
        if not used[0]:
            del self._sources[held.source]
            self._unowned_by_source.pop(held.source, None)
        if not held.entry.owner:
            self._unowned -= 1
        if not record:
            del self._records[key_id]
            self.last_stored.pop(key_id, None)
