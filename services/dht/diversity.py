"""Address diversity: one host counts once, however many ids and ports it runs.

Ids are cheap: anybody can generate keys until one hashes near a key (eclipse), or run many
nodes behind one address (sybil). Addresses are not: so where a few peers decide something
for everyone (a key's replica set, the median of the clock offsets), each *host* counts once.
A host is the address without its port (an IP, or a DNS name as announced). IPv4 and IPv6
addresses are exact (no /24 or /64 grouping: containers of one Docker network share a prefix).

The rule is soft: :func:`diverse` prefers one id per host, nearest first, and only when there
are fewer distinct hosts than places does it fill the rest with the nearest ids left. So a swarm
on one host (tests, the benchmarks on 127.0.0.1) behaves exactly as without the rule, and a
swarm of distinct hosts (compose, Kubernetes) never gives one host more than one place while
another host is still available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

WINDOW = 8  # a routing table's diverse choice of n ids is made among its n * WINDOW nearest


def host_of(address: str) -> str:
    """``10.0.0.7:31330`` -> ``10.0.0.7``; ``[::1]:5`` -> ``[::1]``; no port: as it is."""
    host, sep, _ = address.rpartition(":")
    return host if sep else address


def diverse(ordered: Iterable[int], count: int, address_of: Callable[[int], str]) -> list[int]:
    """The first ``count`` of ``ordered`` (ids, nearest first) taking one per host first, then
    the nearest left; returned in the original order."""
    ordered = list(ordered)
    if len(ordered) <= count:
        return ordered
    hosts: set[str] = set()
    picked: set[int] = set()
    for node_id in ordered:
        host = host_of(address_of(node_id))
        if host not in hosts:
            hosts.add(host)
            picked.add(node_id)
            if len(picked) == count:
                break
    if len(picked) < count:
        for node_id in ordered:
            if node_id not in picked:
                picked.add(node_id)
                if len(picked) == count:
                    break
    return [i for i in ordered if i in picked]


def is_replica(me: str, nearer: list[str], count: int) -> bool:
    """Whether a node at address ``me`` belongs to the ``count`` ids :func:`diverse` picks
    from those nearer a key (``nearer``: their addresses, nearest first) and itself, last.

    It does when fewer than ``count`` are nearer, or when its host is none of theirs and they
    span fewer than ``count`` hosts (the first pass reaches it)."""
    if len(nearer) < count:
        return True
    hosts = {host_of(a) for a in nearer}
    return host_of(me) not in hosts and len(hosts) < count
