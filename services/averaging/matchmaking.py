"""Groups through the DHT, without a leader: time slots, signed announcements, one shared shuffle.

Time (the DHT's clock, ``DHTClient.now()``) is cut into slots of ``window`` seconds. A trainer
ready to average announces itself under ``avg.<run>.<slot>`` (an *owned* entry: signed, in its
own slot of the key, so nobody can remove or forge it; with ``--trusted-keys`` only listed
keys are read back), waits until the slot ends plus ``settle`` seconds, and reads the key. Every
trainer of the slot then holds the same list and cuts it the same way: the members are ordered
by SHA-256(run, slot, public key), a permutation that changes every slot, and dealt round-robin
into ``ceil(n / target)`` groups, so groups differ by at most one member and are never smaller
than 2 when n >= 2. Because the order is re-drawn every slot, groups mix from round to round
(12 trainers with target 4: each meets new partners every round).

Agreement is checked, not assumed: the group's digest (run, slot, member keys in order) travels
with every chunk, and a reducer whose own view differs refuses the chunk. Views differ only when
an announcement reached the DHT after somebody read the key (a clock further off than
``settle``, a DHT put slower than it); those groups fail their round safely.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from services.common.addresses import is_peer_address
from services.proto import averager_pb2

READY_SUBKEY = b"ready"
STATE_SUBKEY = b"state"


def round_key(run_id: str, slot: int) -> str:
    return f"avg.{run_id}.{slot}"


def state_key(run_id: str) -> str:
    return f"avg.{run_id}.state"


def next_slot(now: float, window: float, lead: float) -> int:
    """The first slot whose announcements still close at least ``lead`` seconds from now."""
    slot = math.floor(now / window)
    if (slot + 1) * window - now < lead:
        slot += 1
    return slot


@dataclass(frozen=True)
class Member:
    key: bytes  # ed25519 public key
    address: str
    size: int
    step: int = 0


def parse_announce(owner: bytes, value: bytes) -> Member | None:
    """A member from an owned DHT entry; None for anything malformed (a stranger wrote it)."""
    if not owner or len(value) > 1024:
        return None
    try:
        msg = averager_pb2.AveragerAnnounce.FromString(value)
    except DecodeError:
        return None
    if not is_peer_address(msg.address):
        return None
    return Member(owner, msg.address, int(msg.size), int(msg.step))


def members_from(found: object, size: int) -> tuple[list[Member], int]:
    """The valid announcements of vectors of ``size`` in one DHT answer; also how many
    entries were skipped (malformed, another size)."""
    members: dict[bytes, Member] = {}
    skipped = 0
    if isinstance(found, dict):
        for entry in found.get(READY_SUBKEY, []):
            member = parse_announce(entry.owner, entry.value)
            if member is None or member.size != size:
                skipped += 1
                continue
            members.setdefault(member.key, member)
    return list(members.values()), skipped


def order_key(run_id: str, slot: int, key: bytes) -> bytes:
    return hashlib.sha256(f"{run_id}\0{slot}\0".encode() + key).digest()


def groups_of(members: list[Member], run_id: str, slot: int, target: int) -> list[list[Member]]:
    """Every group of the slot, as every member computes it."""
    ordered = sorted(members, key=lambda m: order_key(run_id, slot, m.key))
    count = max(1, math.ceil(len(ordered) / max(2, target)))
    return [ordered[i::count] for i in range(count)]


def group_digest(run_id: str, slot: int, group: list[Member]) -> bytes:
    h = hashlib.sha256(f"{run_id}\0{slot}\0".encode())
    for member in group:
        h.update(member.key)
    return h.digest()


def part_bounds(size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous slices of ``size`` elements, lengths differing by at most one."""
    cuts = [size * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(cuts))
