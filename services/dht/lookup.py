"""Iterative Kademlia lookup for many keys at once, in synchronous rounds.

Each key keeps a beam: the ``k`` nearest live candidates seen so far. In every round,
each unfinished key asks the ``alpha`` nearest candidates of its beam it has not asked
yet; when a round brought nothing closer than the closest already seen, it asks *all*
the unasked candidates of its beam at once (the paper's final step). A key is done when
every candidate of its beam has answered (or, for a plain get, as soon as any value
was found). Requests of all keys that go to the same peer in a round travel in one
``Find`` call, so a batched put/get of hundreds of keys costs few RPCs.

Rounds are synchronous (a round waits for all its calls, each bounded by the short
per-RPC deadline) so "hops" are exact: one round is one wave of parallel RPCs on the
critical path. A peer that fails is dropped from every beam and reported to
``on_failure`` (blacklist, routing table).

Hostile answers (a peer may name any ids at any addresses, e.g. ever-closer fake ids at
its own address, so that a lookup never ends):
- each address is one candidate: a second id claimed for an address already in the lookup
  is ignored, and so is an id the node knows to be false (``claim_ok``: the address proved
  another id by a signed ping);
- a key's lookup asks at most ``max_rpcs`` peers in at most ``max_rounds`` rounds, then ends
  with what it has (honest lookups need far fewer: docs/dht.md);
- the beam and the replica set take one id per host first (:mod:`services.dht.diversity`), so
  ids ground near a key from one address cannot fill either.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from services.dht.diversity import diverse, host_of
from services.dht.storage import Entry

# find(peer_id, address, targets) -> per target: (entries, [(node_id, address), ...])
FindCall = Callable[
    [int, str, list[int]], Awaitable[list[tuple[list[Entry], list[tuple[int, str]]]]]
]


@dataclass
class KeyLookup:
    """The state of one key's lookup; read ``answered``/``holders``/``entries`` after."""

    target: int
    k: int
    stop_on_value: bool
    max_rpcs: int = 0  # 0: no bound
    max_rounds: int = 0
    claim_ok: Callable[[int, str], bool] = lambda _id, _address: True
    candidates: dict[int, str] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)  # of every id ever offered
    queried: set[int] = field(default_factory=set)
    answered: dict[int, str] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    entries: list[Entry] = field(default_factory=list)
    holders: set[int] = field(default_factory=set)
    rounds: int = 0
    rpcs: int = 0
    improved: bool = True
    best: int | None = None

    def offer(self, node_id: int, address: str) -> None:
        if (
            node_id in self.failed
            or node_id in self.candidates
            or address in self.addresses  # one id per address
            or not self.claim_ok(node_id, address)
        ):
            return
        self.candidates[node_id] = address
        self.addresses.add(address)
        self.hosts.add(host_of(address))

    def beam(self) -> list[int]:
        return self._nearest(self.candidates, self.k)

    def _nearest(self, ids: dict[int, str], count: int) -> list[int]:
        """The ``count`` nearest ``ids``, one per host first among *all* of them (a lookup
        holds tens of candidates), so ids ground near the key on one host never push the
        other hosts out."""
        target = self.target
        if len(ids) <= count:
            return sorted(ids, key=lambda i: i ^ target)
        nearest = heapq.nsmallest(count, ids, key=lambda i: i ^ target)
        if len(self.hosts) <= 1:
            return nearest  # one host (a test swarm, the benchmarks): nothing to prefer
        hosts = {host_of(ids[i]) for i in nearest}
        if len(hosts) == count:
            return nearest  # already one per host
        return diverse(sorted(ids, key=lambda i: i ^ target), count, ids.__getitem__)

    def exhausted(self) -> bool:
        """The lookup spent its budget of RPCs or rounds."""
        return bool(
            (self.max_rpcs and self.rpcs >= self.max_rpcs)
            or (self.max_rounds and self.rounds >= self.max_rounds)
        )

    def next_peers(self, alpha: int) -> list[int]:
        if (self.stop_on_value and self.entries) or self.exhausted():
            return []
        unasked = [i for i in self.beam() if i not in self.queried]
        picks = unasked[:alpha] if self.improved else unasked
        if self.max_rpcs:
            picks = picks[: self.max_rpcs - self.rpcs]
        return picks

    def end_round(self) -> None:
        best = min((i ^ self.target for i in self.candidates), default=None)
        self.improved = best is not None and (self.best is None or best < self.best)
        if best is not None and (self.best is None or best < self.best):
            self.best = best

    def answer(
        self,
        peer: int,
        address: str,
        entries: list[Entry],
        nearest: list[tuple[int, str]],
        is_blocked: Callable[[str], bool],
    ) -> None:
        """``peer`` answered: record its entries and offer the peers it named."""
        self.queried.add(peer)
        self.answered[peer] = address
        if entries:
            self.entries.extend(entries)
            self.holders.add(peer)
        for node_id, node_address in nearest:
            if not is_blocked(node_address):
                self.offer(node_id, node_address)

    def drop(self, peer: int) -> None:
        """``peer`` failed: never ask or offer it again."""
        self.queried.add(peer)
        self.failed.add(peer)
        address = self.candidates.pop(peer, None)
        if address is not None:
            self.addresses.discard(address)  # another id may live there now (a restart)

    def nearest_answered(self, count: int) -> list[tuple[int, str]]:
        """The ``count`` answered nodes nearest the target, one per host first (the replica
        set)."""
        return [(i, self.answered[i]) for i in self._nearest(self.answered, count)]


def start_lookups(
    targets: Sequence[int],
    *,
    self_id: int,
    self_address: str,
    local: Callable[[int], list[Entry]] | None,
    initial: Callable[[int], list[tuple[int, str]]],
    is_blocked: Callable[[str], bool],
    k: int,
    stop_on_value: bool,
    max_rpcs: int = 0,
    max_rounds: int = 0,
    claim_ok: Callable[[int, str], bool] | None = None,
) -> list[KeyLookup]:
    """The lookup states before the first round: this node (answered from ``local``, its
    own entries; None: no values wanted) and the ``initial`` candidates of each target."""
    states = []
    for target in targets:
        state = KeyLookup(target, k, stop_on_value, max_rpcs, max_rounds)
        if claim_ok is not None:
            state.claim_ok = claim_ok
        state.candidates[self_id] = self_address
        state.addresses.add(self_address)
        state.hosts.add(host_of(self_address))
        state.queried.add(self_id)
        state.answered[self_id] = self_address
        if local is not None:
            held = local(target)
            if held:
                state.entries.extend(held)
                state.holders.add(self_id)
        for node_id, address in initial(target):
            if not is_blocked(address):
                state.offer(node_id, address)
        state.end_round()
        state.improved = True
        states.append(state)
    return states


async def run_rounds(
    states: list[KeyLookup],
    *,
    find: FindCall,
    on_failure: Callable[[int, str], None],
    is_blocked: Callable[[str], bool],
    alpha: int,
) -> None:
    """Ask ``Find`` rounds until every state is done (see the module docstring)."""
    active = [s for s in states if s.next_peers(alpha)]
    while active:
        requests: dict[int, list[KeyLookup]] = defaultdict(list)
        addresses: dict[int, str] = {}
        for state in active:
            picks = state.next_peers(alpha)
            if not picks:
                continue
            state.rounds += 1
            for peer in picks:
                state.queried.add(peer)
                state.rpcs += 1
                requests[peer].append(state)
                addresses[peer] = state.candidates[peer]
        if not requests:
            break

        async def ask(peer: int, address: str, group: list[KeyLookup]) -> None:
            try:
                answers = await find(peer, address, [s.target for s in group])
            except Exception:
                on_failure(peer, address)
                for state in group:
                    state.drop(peer)
                return
            for state, (entries, nearest) in zip(group, answers, strict=True):
                state.answer(peer, address, entries, nearest, is_blocked)

        await asyncio.gather(*(ask(p, addresses[p], group) for p, group in requests.items()))
        for state in active:
            state.end_round()
        active = [s for s in active if s.next_peers(alpha)]
