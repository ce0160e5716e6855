"""Kademlia routing: 160-bit ids, XOR distance and the k-bucket table.

Ids are plain Python ints inside the node (XOR and comparisons are fast on ints) and
20 big-endian bytes on the wire. Keys are hashed with SHA-1 to the same id space.

The table follows the paper's rule with the relaxed split of section 4.2: a full
bucket splits when it holds the node's own id *or* its depth is not a multiple of
``depth_modulo`` (b). The second condition keeps more contacts near the node at the
price of a larger table (~ k * 2^(b-1) per level instead of k), which cuts the hops of
a lookup to about log_{2^b}(n). A full bucket that may not split keeps newcomers in a
replacement cache and asks its caller to ping the least-recently-seen contact; only
a contact that fails the ping is evicted (long-lived peers are preferred).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.dht.diversity import WINDOW, diverse, host_of

ID_BYTES = 20
ID_BITS = ID_BYTES * 8
ID_SPACE = 1 << ID_BITS


def key_to_id(key: bytes) -> int:
    """The id a key is stored under: SHA-1 of the key bytes."""
    return int.from_bytes(hashlib.sha1(key).digest(), "big")


def id_from_bytes(raw: bytes) -> int:
    """Wire bytes -> id; raises ValueError unless exactly 20 bytes."""
    if len(raw) != ID_BYTES:
        raise ValueError(f"id must be {ID_BYTES} bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


def id_to_bytes(node_id: int) -> bytes:
    return node_id.to_bytes(ID_BYTES, "big")


def random_id(lower: int = 0, upper: int = ID_SPACE) -> int:
    """A uniformly random id in ``[lower, upper)``."""
    span = upper - lower
    return lower + int.from_bytes(os.urandom(ID_BYTES + 4), "big") % span


def nearest_of(target: int, ids: Iterable[int], count: int) -> list[int]:
    """The ``count`` ids closest to ``target`` by XOR, nearest first (brute force)."""
    return heapq.nsmallest(count, ids, key=lambda i: i ^ target)


@dataclass
class KBucket:
    """Contacts whose ids fall in ``[lower, upper)``; ``nodes`` is least-recently-seen first."""

    lower: int
    upper: int
    depth: int
    nodes: OrderedDict[int, str] = field(default_factory=OrderedDict)
    replacements: OrderedDict[int, str] = field(default_factory=OrderedDict)
    last_updated: float = field(default_factory=time.monotonic)
    pinging: bool = False

    def covers(self, node_id: int) -> bool:
        return self.lower <= node_id < self.upper

    def split(self) -> tuple[KBucket, KBucket]:
        middle = (self.lower + self.upper) // 2
        left = KBucket(self.lower, middle, self.depth + 1, last_updated=self.last_updated)
        right = KBucket(middle, self.upper, self.depth + 1, last_updated=self.last_updated)
        for source, attr in ((self.nodes, "nodes"), (self.replacements, "replacements")):
            for node_id, address in source.items():
                target = left if node_id < middle else right
                getattr(target, attr)[node_id] = address
        return left, right


class RoutingTable:
    """The k-buckets of one node, with an address index to drop ids a peer abandoned."""

    def __init__(self, node_id: int, k: int = 20, depth_modulo: int = 5) -> None:
        if k < 1 or depth_modulo < 1:
            raise ValueError("k and depth_modulo must be positive")
        self.node_id = node_id
        self.k = k
        self.depth_modulo = depth_modulo
        self.buckets: list[KBucket] = [KBucket(0, ID_SPACE, 0)]
        self._nodes: dict[int, str] = {}  # every contact in a bucket (not replacements)
        self._by_address: dict[str, int] = {}
        self._hosts: dict[str, int] = {}  # host -> contacts there

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: int) -> bool:
        return node_id in self._nodes

    def address_of(self, node_id: int) -> str | None:
        return self._nodes.get(node_id)

    def host_count(self) -> int:
        """How many distinct hosts the contacts live on."""
        return len(self._hosts)

    def contacts(self) -> dict[int, str]:
        return dict(self._nodes)

    def bucket_for(self, node_id: int) -> KBucket:
        lo, hi = 0, len(self.buckets)
        while hi - lo > 1:  # buckets are sorted and tile the id space
            mid = (lo + hi) // 2
            if self.buckets[mid].lower <= node_id:
                lo = mid
            else:
                hi = mid
        return self.buckets[lo]

    def add_or_update(self, node_id: int, address: str) -> tuple[int, str] | None:
        """Record that ``node_id`` at ``address`` is alive.

        Returns the least-recently-seen contact of a full bucket that could not split;
        the caller should ping it and call :meth:`remove` if it does not answer (the
        newcomer then moves in from the replacement cache).
        """
        if node_id == self.node_id:
            return None
        previous = self._by_address.get(address)
        if previous is not None and previous != node_id:
            self.remove(previous, promote=False)  # a restarted peer: its new id takes the slot
        while True:
            bucket = self.bucket_for(node_id)
            if node_id in bucket.nodes:
                self._forget_address(node_id)
                bucket.nodes[node_id] = address
                bucket.nodes.move_to_end(node_id)
                self._index(node_id, address)
                bucket.last_updated = time.monotonic()
                return None
            if len(bucket.nodes) < self.k:
                bucket.replacements.pop(node_id, None)
                bucket.nodes[node_id] = address
                self._index(node_id, address)
                bucket.last_updated = time.monotonic()
                return None
            if bucket.covers(self.node_id) or bucket.depth % self.depth_modulo != 0:
                self._split(bucket)
                continue
            bucket.replacements[node_id] = address
            bucket.replacements.move_to_end(node_id)
            while len(bucket.replacements) > self.k:
                bucket.replacements.popitem(last=False)
            oldest = next(iter(bucket.nodes.items()))
            return oldest

    def remove(self, node_id: int, promote: bool = True) -> bool:
        """Drop a contact; the most recent replacement takes its place. True if it was held."""
        bucket = self.bucket_for(node_id)
        if node_id in bucket.replacements:
            del bucket.replacements[node_id]
        if node_id not in bucket.nodes:
            return False
        del bucket.nodes[node_id]
        self._forget_address(node_id)
        self._unhost(self._nodes.pop(node_id))
        if promote and bucket.replacements:
            new_id, address = bucket.replacements.popitem(last=True)
            bucket.nodes[new_id] = address
            self._index(new_id, address)
        return True

    def nearest(self, target: int, count: int, exclude: int | None = None) -> list[tuple[int, str]]:
        """The ``count`` contacts closest to ``target``, nearest first, one per host first
        (:func:`services.dht.diversity.diverse`)."""
        nodes = self._nodes
        candidates = (i for i in nodes if i != exclude)
        ids = nearest_of(target, candidates, count)
        if len(self._hosts) > 1 and len({host_of(nodes[i]) for i in ids}) < len(ids):
            # a host holds two of the nearest: prefer other hosts, among a wider window
            ids = nearest_of(target, (i for i in nodes if i != exclude), count * WINDOW)
            if len(ids) > count:
                ids = diverse(ids, count, nodes.__getitem__)
        return [(i, nodes[i]) for i in ids]

    def nearer(self, target: int, than: int, limit: int) -> list[str]:
        """Addresses of the contacts nearer ``target`` than ``than``, nearest first (at most
        ``limit``: collecting stops there)."""
        bound, found = than ^ target, []
        for node_id, address in self._nodes.items():
            if node_id ^ target < bound:
                found.append((node_id ^ target, address))
                if len(found) >= limit:
                    break
        return [address for _, address in sorted(found)]

    def count_nearer(self, target: int, than: int, limit: int) -> int:
        """How many contacts are nearer ``target`` than ``than`` (counting stops at ``limit``)."""
        bound, count = than ^ target, 0
        for node_id in self._nodes:
            if node_id ^ target < bound:
                count += 1
                if count >= limit:
                    break
        return count

    def stale_buckets(self, older_than: float) -> list[KBucket]:
        """Buckets untouched for ``older_than`` seconds (to refresh with a random lookup)."""
        now = time.monotonic()
        return [b for b in self.buckets if now - b.last_updated >= older_than]

    def _split(self, bucket: KBucket) -> None:
        index = self.buckets.index(bucket)
        self.buckets[index : index + 1] = list(bucket.split())

    def _index(self, node_id: int, address: str) -> None:
        old = self._nodes.get(node_id)
        if old is not None:
            self._unhost(old)
        self._nodes[node_id] = address
        self._by_address[address] = node_id
        host = host_of(address)
        self._hosts[host] = self._hosts.get(host, 0) + 1

    def _unhost(self, address: str) -> None:
        host = host_of(address)
        left = self._hosts.get(host, 0) - 1
        if left > 0:
            self._hosts[host] = left
        else:
            self._hosts.pop(host, None)

    def _forget_address(self, node_id: int) -> None:
        address = self._nodes.get(node_id)
        if address is not None and self._by_address.get(address) == node_id:
            del self._by_address[address]
