"""Storage rules: later expiration wins, separate subkey expirations, expiry, limits."""

import time

import pytest

from services.dht.storage import Entry, Storage, StorageFull, merge_entries


class ManualClock:
    """Storage time that moves only when a test says so: expiry is checked without sleeping,
    and a loaded machine's stall cannot expire a 0.2 s entry before it is read."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_later_expiration_wins_and_older_is_refused() -> None:
    s, now = Storage(), time.time()
    assert s.store(1, Entry(None, b"a", now + 10))
    assert not s.store(1, Entry(None, b"old", now + 5))
    assert s.get(1) == [Entry(None, b"a", now + 10)]
    assert s.store(1, Entry(None, b"b", now + 20))
    assert s.get(1) == [Entry(None, b"b", now + 20)]
    assert not s.store(2, Entry(None, b"expired", now - 1))
    assert s.get(2) == []


def test_subkeys_keep_separate_expirations() -> None:
    clock = ManualClock()
    s, now = Storage(clock=clock), clock.now
    assert s.store(7, Entry(b"x", b"1", now + 10))
    assert s.store(7, Entry(b"y", b"2", now + 0.2))
    assert not s.store(7, Entry(b"x", b"stale", now + 5))  # older than the held x
    assert {e.subkey: e.value for e in s.get(7)} == {b"x": b"1", b"y": b"2"}
    clock.now += 0.3
    assert s.get(7) == [Entry(b"x", b"1", now + 10)]  # y expired, x untouched
    # a plain value replaces the dictionary only with a later expiration
    assert not s.store(7, Entry(None, b"plain", now + 9))
    assert s.store(7, Entry(None, b"plain", now + 11))
    assert s.get(7) == [Entry(None, b"plain", now + 11)]
    assert not s.store(7, Entry(b"z", b"3", now + 11))
    assert s.store(7, Entry(b"z", b"3", now + 12))
    assert s.get(7) == [Entry(b"z", b"3", now + 12)]


def test_expired_entries_are_purged_and_counted() -> None:
    clock = ManualClock()
    s, now = Storage(clock=clock), clock.now
    s.store(1, Entry(None, b"a", now + 0.1))
    s.store(2, Entry(b"k", b"b", now + 0.1))
    s.store(3, Entry(None, b"c", now + 60))
    assert len(s) == 3
    clock.now += 0.2
    assert s.purge() == 2
    assert len(s) == 1 and s.keys() == [3]


def test_capacity_refuses_new_entries_but_allows_updates() -> None:
    s, now = Storage(max_entries=2), time.time()
    s.store(1, Entry(None, b"a", now + 10))
    s.store(2, Entry(b"k", b"b", now + 10))
    with pytest.raises(StorageFull):
        s.store(3, Entry(None, b"c", now + 10))
    with pytest.raises(StorageFull):
        s.store(2, Entry(b"other", b"c", now + 10))
    assert s.store(1, Entry(None, b"a2", now + 20))  # update in place needs no room
    assert s.store(2, Entry(b"k", b"b2", now + 20))
    assert len(s) == 2


def test_cache_evicts_soonest_expiring() -> None:
    s, now = Storage(max_entries=2, evict_when_full=True), time.time()
    s.store(1, Entry(None, b"a", now + 5))
    s.store(2, Entry(None, b"b", now + 50))
    assert s.store(3, Entry(None, b"c", now + 20))
    assert s.get(1) == [] and s.get(2) and s.get(3)


def test_merge_later_expiration_per_subkey() -> None:
    now = time.time()
    merged = merge_entries(
        [
            Entry(b"a", b"1", now + 5),
            Entry(b"a", b"2", now + 9),
            Entry(b"b", b"3", now + 1),
            Entry(b"c", b"gone", now - 1),
            Entry(None, b"plain", now + 3),
        ],
        now=now,  # read at the same instant: a stall cannot expire the 1 s entry
    )
    assert merged == [Entry(b"a", b"2", now + 9), Entry(b"b", b"3", now + 1)]
    assert merge_entries([Entry(None, b"p", now + 10), Entry(b"a", b"1", now + 5)]) == [
        Entry(None, b"p", now + 10)
    ]


OWNER_A, OWNER_B = b"a" * 32, b"b" * 32


def test_owned_slots_are_separate_and_never_erased_by_plain_values() -> None:
    """Storage rules for owned entries (signatures are checked before storage: here the
    rules alone)."""
    s, now = Storage(), time.time()
    a = Entry(b"3", b"host-a:1", now + 30, OWNER_A, b"s" * 64)
    b = Entry(b"3", b"host-b:1", now + 30, OWNER_B, b"s" * 64)
    assert s.store(1, a) and s.store(1, b)
    assert s.store(1, Entry(b"3", b"stranger:1", now + 3000))  # an unowned slot of its own
    assert {e.value for e in s.get(1)} == {b"host-a:1", b"host-b:1", b"stranger:1"}
    # replay of an older entry of A's slot: refused; A's newer one replaces it
    assert not s.store(1, a._replace(expiration=now + 10))
    assert s.store(1, a._replace(value=b"host-a:2", expiration=now + 40))
    # a plain value never replaces a dictionary holding owned entries, whatever its expiration
    assert not s.store(1, Entry(None, b"erase", now + 86_000))
    assert len(s.get(1)) == 3
    # an owned entry displaces a squatting plain value; an unowned one only when it expires later
    assert s.store(2, Entry(None, b"squat", now + 86_000))
    assert not s.store(2, Entry(b"3", b"x", now + 30))
    assert s.store(2, a)
    assert s.get(2) == [a]


def test_merge_keeps_owned_entries_and_the_latest_per_slot() -> None:
    now = time.time()
    a_old = Entry(b"3", b"old", now + 10, OWNER_A, b"s" * 64)
    a_new = a_old._replace(value=b"new", expiration=now + 20)
    b = Entry(b"3", b"b", now + 15, OWNER_B, b"s" * 64)
    plain = Entry(None, b"erase", now + 999)
    assert merge_entries([a_old, plain, b, a_new]) == [a_new, b]
    assert merge_entries([plain, Entry(b"x", b"1", now + 5)]) == [plain]  # unowned: latest wins


def test_keep_until_shortens_an_entry_from_a_skewed_peer() -> None:
    clock = ManualClock()
    s, now = Storage(clock=clock), clock.now
    assert s.store(1, Entry(b"x", b"v", now + 60), keep_until=now + 0.1)
    assert s.get(1)
    clock.now += 0.15
    assert s.get(1) == []


def test_quotas_per_source_unowned_share_and_bytes() -> None:
    """One source holds at most its quota; unowned entries at most their share; a signed entry
    evicts unowned ones (the soonest-expiring first, the same source's first when that source
    is over its quota); the byte cap counts values; charges follow replacements."""
    owner = b"o" * 32  # ownership is checked by the protocol, not here
    s, now = (
        Storage(max_entries=10, max_per_source=4, max_unowned=6, max_bytes=1 << 20),
        time.time(),
    )
    for i in range(4):
        assert s.store(i, Entry(b"s", b"x", now + 10 + i), source="10.0.0.2")
    with pytest.raises(StorageFull, match="quota"):
        s.store(9, Entry(b"s", b"x", now + 10), source="10.0.0.2")
    assert s.store(0, Entry(b"s", b"y", now + 30), source="10.0.0.2")  # a renewal needs no room
    assert s.held_by("10.0.0.2")[0] == 4
    # the same source's signed entry evicts its own soonest-expiring unowned one (key 1)
    assert s.store(20, Entry(b"s", b"v", now + 10, owner), source="10.0.0.2")
    assert s.get(1) == [] and s.held_by("10.0.0.2")[0] == 4
    for i in range(2):
        assert s.store(30 + i, Entry(b"s", b"x", now + 5), source=f"10.0.1.{i}")
    assert s._unowned == 5
    assert s.store(40, Entry(b"s", b"x", now + 50), source="10.0.2.1")
    with pytest.raises(StorageFull, match="unowned"):
        s.store(41, Entry(b"s", b"x", now + 50), source="10.0.2.2")
    # full: signed entries evict the soonest-expiring unowned ones, never each other
    for i in range(3):
        assert s.store(50 + i, Entry(b"s", b"v", now + 60, owner), source=f"10.0.3.{i}")
    assert len(s) == 10 and s.get(30) and s.get(31)
    assert s.store(60, Entry(b"s", b"v", now + 60, owner))  # this node's own: no quota
    assert s.store(61, Entry(b"s", b"v", now + 60, owner), source="10.0.3.9")
    assert len(s) == 10 and s.get(30) == [] and s.get(31) == [] and s.get(40)
    assert s.store(62, Entry(b"s", b"v", now + 60, owner), source="10.0.3.8")
    assert s.get(2) == [] and s.get(40) and s._unowned == 3  # the soonest to expire went
    small = Storage(max_entries=100, max_bytes=5000)
    assert small.store(1, Entry(b"s", b"v" * 4000, now + 10))
    with pytest.raises(StorageFull, match="bytes"):
        small.store(2, Entry(b"s", b"v" * 1000, now + 10))


def test_the_same_entry_stored_again_keeps_its_source() -> None:
    """A republish (this node's own write) of an entry a peer stored must not move the charge
    off that peer's quota."""
    s, now = Storage(max_per_source=2), time.time()
    entry = Entry(b"s", b"x", now + 10)
    assert s.store(1, entry, source="10.0.0.2")
    assert s.store(1, entry)
    assert s.held_by("10.0.0.2")[0] == 1 and s.held_by("")[0] == 0
    assert s.store(1, Entry(b"s", b"y", now + 20), source="10.0.0.3")  # a renewal: its writer
    assert s.held_by("10.0.0.2")[0] == 0 and s.held_by("10.0.0.3")[0] == 1
