"""One DHT node: who it talks to, and the lookups its operations are built on.

The node holds the parts (routing table, storage, cache, clock, identity: the
:class:`~services.dht.peer_state.PeerState` its peer handlers get) and does three things:
- **contacts**: a peer enters the routing table only once it proved, at the address it
  claimed, that its id is the hash of a key it holds (a signed ping); a claim alone (a
  caller's ``sender``, an answer's ``peer``) only triggers that check, so a forged claim never
  evicts anyone. Peers that fail a call are removed and blacklisted with exponential backoff;
  a proven new contact gets the records it is now a replica of (hand-off);
- **lookups** (:mod:`services.dht.lookup`): many keys at once, in rounds, with calls to one
  peer in one event-loop turn merged into one RPC (:mod:`services.dht.coalescer`);
- **get** with caching: a plain get stops at the first hit, a ``latest`` get asks on until
  the beam has answered (in a small swarm, all at once) and merges (later expiration wins
  per slot); the merged value is then cached, in the background, on the nearest answered
  node that lacked it.
Put is :mod:`services.dht.replicated_store`, republish and hand-off :mod:`services.dht.replication`,
bootstrap and upkeep :mod:`services.dht.maintenance`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from services.common.addresses import is_peer_address
from services.common.errors import CallError
from services.common.identity import Identity
from services.common.rejections import Rejections
from services.dht import maintenance
from services.dht.blacklist import Blacklist
from services.dht.clock import DHTClock
from services.dht.coalescer import Coalescer
from services.dht.config import NodeConfig
from services.dht.lookup import KeyLookup, run_rounds, start_lookups
from services.dht.metrics import NullMetrics
from services.dht.peer_state import PeerState
from services.dht.ping_proof import proven_id
from services.dht.protocol import PeerProtocol
from services.dht.records import Entry, ownership_problem
from services.dht.replicated_store import ReplicatedStore
from services.dht.replication import hand_off
from services.dht.routing import ID_BYTES, id_from_bytes, id_to_bytes
from services.dht.storage import StorageFull, merge_entries
from services.dht.transport import Transport
from services.dht.wire import entry_to_proto, parse_wire_entry
from services.proto import dht_pb2

log = logging.getLogger(__name__)
# a peer that answers with these is gone (or too slow to count on), not just refusing
_UNREACHABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

Answer = tuple[list[Entry], list[tuple[int, str]]]  # a peer's (entries, nearest peers) per key


def _peers(infos: Iterable[dht_pb2.NodeInfo]) -> list[tuple[int, str]]:
    """(id, address) of well-formed peer infos; malformed ones (and addresses that are not
    ``host:port``: a stranger's list must not make us dial ``unix:`` sockets) are skipped."""
    peers = []
    for info in infos:
        raw = info.node_id
        if len(raw) == ID_BYTES and is_peer_address(info.address):
            peers.append((int.from_bytes(raw, "big"), info.address))
    return peers


class DHTNode:
    """A Kademlia node reachable at ``address`` through ``transport``."""

    def __init__(
        self,
        transport: Transport,
        config: NodeConfig | None = None,
        *,
        identity: Identity | None = None,
        address: str = "",
        metrics: Any = None,
        trusted: frozenset[bytes] | None = None,
        rejections: Rejections | None = None,
    ) -> None:
        config = config or NodeConfig()
        self.config = config
        self.transport = transport
        self.metrics = metrics or NullMetrics()
        offset = config.simulate_clock_offset
        clock = DHTClock(
            config.max_clock_skew,
            config.max_clock_correction,
            source=(lambda: time.time() + offset) if offset else time.time,
        )
        clock.on_skewed = self.metrics.skewed_peer
        self.state = PeerState.create(
            config,
            identity or Identity.generate(),
            clock,
            rejections or Rejections("dht", None, log),
            trusted,
            self.on_contact,
        )
        state = self.state
        self.identity, self.node_id, self.trusted = state.identity, state.node_id, trusted
        self.table, self.storage, self.cache = state.table, state.storage, state.cache
        self.clock, self.rejections = state.clock, state.rejections
        self.blacklist = Blacklist(config.blacklist_base, config.blacklist_max)
        # addresses that proved their id by a signed ping (LRU), and those being asked
        self.verified: OrderedDict[str, int] = OrderedDict()
        self._verifying: set[str] = set()
        self._unverifiable: dict[str, float] = {}  # address -> monotonic time to ask again
        self.protocol = PeerProtocol(state)
        self.joined = asyncio.Event()
        self.initial_peers: list[str] = []
        self.state_file: Path | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: list[asyncio.Task[Any]] = []
        self.address = address
        self._finds: Coalescer[Any, int, Answer] = Coalescer(
            self._find_rpc, config.max_keys_per_request, self._spawn
        )
        self._stores: Coalescer[Any, Any, Any] = Coalescer(
            self._store_rpc, config.max_keys_per_request, self._spawn
        )
        self.value_beam = max(config.value_beam or config.num_replicas, 1)

    @property
    def address(self) -> str:
        return self._address

    @address.setter
    def address(self, value: str) -> None:
        self._address = value
        self.state.announce(value)

    @property
    def info(self) -> dht_pb2.NodeInfo:
        return self.state.info

    @property
    def stopping(self) -> bool:
        return self.state.stopping

    @stopping.setter
    def stopping(self, value: bool) -> None:
        self.state.stopping = value

    # ------------------------------------------------------------------ lifecycle
    async def start(
        self, initial_peers: Sequence[str] = (), state_file: Path | None = None
    ) -> None:
        """Start bootstrap (in the background) and maintenance; see ``joined``.

        ``state_file``: contacts saved by a previous run (:func:`maintenance.save_state` on
        :meth:`stop`) join the initial peers. A node without initial peers is joined at once
        (it may be the first node); it still pings the saved contacts to rejoin them.
        """
        self.state_file = state_file
        saved = maintenance.load_state(state_file) if state_file is not None else []
        own = [p for p in initial_peers if p != self.address]
        self.initial_peers = list(dict.fromkeys([*own, *saved]))
        if own:
            self._main.append(asyncio.create_task(maintenance.bootstrap(self)))
        else:
            self.joined.set()
            if saved:
                self._spawn(maintenance.reconnect_seeds(self))
        self._main.append(asyncio.create_task(maintenance.run(self)))

    async def stop(self) -> None:
        self.stopping = True
        tasks = [*self._main, *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.state_file is not None and len(self.table):
            try:
                maintenance.save_state(self, self.state_file)
            except OSError as exc:
                log.warning("cannot save routing state", extra={"error": str(exc)})

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ contacts
    def on_contact(self, node_id: int, address: str) -> None:
        """A peer claims ``node_id`` at ``address`` (it called us or answered). A claim
        that address already proved refreshes it in the table; any other starts a signed
        ping to that address first (:meth:`ping`), so nobody enters the table, or evicts
        anyone, with an id they cannot prove."""
        if node_id == self.node_id or not address:
            return
        if self.verified.get(address) != node_id:
            self._verify_later(address)
            return
        self.verified.move_to_end(address)
        self.blacklist.clear(address)
        new = node_id not in self.table
        oldest = self.table.add_or_update(node_id, address)
        if new and node_id in self.table and len(self.storage) and not self.stopping:
            self._spawn(hand_off(self, node_id, address))
        if oldest is not None:
            bucket = self.table.bucket_for(oldest[0])
            if not bucket.pinging and not self.stopping:
                bucket.pinging = True
                self._spawn(self._ping_or_evict(oldest[0], oldest[1]))

    def _verify_later(self, address: str) -> None:
        if (
            address in self._verifying
            or self.stopping
            or len(self._verifying) >= self.config.max_verifications
            or self.blacklist.blocked(address)
            or self._unverifiable.get(address, 0.0) > time.monotonic()
        ):
            return
        self._verifying.add(address)
        self._spawn(self._verify(address))

    async def _verify(self, address: str) -> None:
        try:
            await self.ping(address)
        finally:
            self._verifying.discard(address)

    def _proved(self, address: str, node_id: int) -> None:
        self.verified[address] = node_id
        self.verified.move_to_end(address)
        while len(self.verified) > 4 * self.config.k * 64:
            self.verified.popitem(last=False)
        self._unverifiable.pop(address, None)

    def _unproved(self, address: str) -> None:
        self.metrics.verification("refused")
        self.rejections.reject(
            "unproven_id", "peer did not prove its id (ping signature)", source=address
        )
        now = time.monotonic()
        self._unverifiable[address] = now + self.config.verify_retry
        if len(self._unverifiable) > 4096:
            self._unverifiable = {a: t for a, t in self._unverifiable.items() if t > now}

    def on_failure(self, node_id: int | None, address: str) -> None:
        if node_id is not None:
            self.table.remove(node_id)
        self.blacklist.fail(address)
        self.clock.forget(address)

    async def _ping_or_evict(self, node_id: int, address: str) -> None:
        try:
            reply = await self.ping(address)
        finally:
            self.table.bucket_for(node_id).pinging = False
        if reply is None:
            self.on_failure(node_id, address)
        elif reply.peer.node_id != id_to_bytes(node_id):
            self.table.remove(node_id)  # another node lives there now (ping added it)
        else:
            self.on_contact(node_id, address)

    def _answered(self, peer: dht_pb2.NodeInfo, address: str) -> None:
        with contextlib.suppress(ValueError):
            self.on_contact(id_from_bytes(peer.node_id), address)

    # ------------------------------------------------------------------ outgoing RPCs
    async def _call(self, address: str, method: str, request: Any) -> Any:
        started = time.perf_counter()
        try:
            reply = await self.transport.call(address, method, request, self.config.rpc_timeout)
        except CallError as exc:
            self.metrics.rpc(method, exc.code.name, time.perf_counter() - started)
            raise
        self.metrics.rpc(method, "OK", time.perf_counter() - started)
        return reply

    async def ping(self, address: str) -> dht_pb2.PingResponse | None:
        """Ping ``address``; the reply must prove the peer's id (it signs our nonce). A proven
        peer enters the routing table and its clock is compared with ours; None when it
        does not answer or cannot prove its id."""
        nonce = os.urandom(16)
        sent = self.clock.source()
        try:
            reply = await self._call(
                address, "Ping", dht_pb2.PingRequest(sender=self.info, nonce=nonce)
            )
        except CallError:
            return None
        peer_id = proven_id(reply.peer, nonce, reply.signature)
        if peer_id is None:
            self._unproved(address)
            return None
        self.metrics.verification("proved")
        self.clock.observe(address, reply.dht_time, sent, self.clock.source())
        self._proved(address, peer_id)
        self.on_contact(peer_id, address)
        return reply

    async def _find_rpc(self, dest: tuple[int, str, bool, int], targets: list[int]) -> list[Answer]:
        peer_id, address, nodes_only, beam = dest
        asked = list(dict.fromkeys(targets))  # lookups batched together may share a key
        request = dht_pb2.FindRequest(
            sender=self.info,
            key_ids=[id_to_bytes(t) for t in asked],
            nodes_only=nodes_only,
            max_nearest=beam,
        )
        try:
            reply = await self._call(address, "Find", request)
        except CallError as exc:
            if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # busy or too large: not dead
                self.on_failure(peer_id, address)
            raise
        if len(reply.results) != len(asked):
            self.on_failure(peer_id, address)
            raise CallError(grpc.StatusCode.INTERNAL, "peer answered the wrong number of results")
        self._answered(reply.peer, address)
        answers = {
            target: (self._believable(target, result.entries, address), _peers(result.nearest))
            for target, result in zip(asked, reply.results, strict=True)
        }
        return [answers[t] for t in targets]

    def _believable(
        self, key_id: int, entries: Iterable[dht_pb2.ValueEntry], source: str
    ) -> list[Entry]:
        """A peer's answer for ``key_id`` without what it could have forged: entries whose
        ownership does not hold would otherwise shadow real ones in the merge."""
        key = id_to_bytes(key_id)
        kept = []
        for e in entries:
            entry = parse_wire_entry(e)
            problem = ownership_problem(key, entry, self.trusted)
            if problem:
                self.rejections.reject(problem, "dropped an entry a peer returned", source)
                continue
            kept.append(entry)
        return kept

    async def store_rpc(
        self, node_id: int, address: str, items: list[dht_pb2.StoreItem], replicas: int = 0
    ) -> list[tuple[bool, bool, list[tuple[int, str]], bytes]]:
        """Store ``items`` at one peer (conditional when ``replicas``), sharing the RPC with
        other stores to that peer in this loop turn; per item (stored, declined, nearest
        peers, demote token)."""
        return await self._stores.submit((node_id, address, replicas), items)

    async def _store_rpc(
        self, dest: tuple[int, str, int], items: list[dht_pb2.StoreItem]
    ) -> list[tuple[bool, bool, list[tuple[int, str]], bytes]]:
        """One Store call. A peer that is unreachable or too slow is reported failed."""
        node_id, address, replicas = dest
        request = dht_pb2.StoreRequest(
            sender=self.info, items=items, replicas=replicas, dht_time=self.clock.now()
        )
        try:
            reply = await self._call(address, "Store", request)
        except CallError as exc:
            if exc.code in _UNREACHABLE:
                self.on_failure(node_id, address)
            raise
        self._answered(reply.peer, address)
        if len(reply.stored) != len(items):
            raise CallError(grpc.StatusCode.INTERNAL, "peer answered the wrong number of flags")
        if not replicas:
            return [(ok, False, [], b"") for ok in reply.stored]
        if len(reply.declined) != len(items) or len(reply.nearest) != len(items):
            raise CallError(grpc.StatusCode.INTERNAL, "peer answered the wrong number of results")
        tokens = list(reply.demote_tokens)
        if len(tokens) != len(items):
            tokens = [b""] * len(items)  # nothing to demote with: copies stay replicas
        return [
            (ok, declined, _peers(result.nearest), token)
            for ok, declined, result, token in zip(
                reply.stored, reply.declined, reply.nearest, tokens, strict=True
            )
        ]

    # ------------------------------------------------------------------ lookups
    def start_lookups(
        self, targets: Sequence[int], *, values: bool, width: int, latest: bool = False
    ) -> list[KeyLookup]:
        return start_lookups(
            targets,
            self_id=self.node_id,
            self_address=self.address,
            local=self.state.local_entries if values else None,
            initial=lambda t: self.table.nearest(t, self.config.k),
            is_blocked=self.blacklist.blocked,
            k=width,
            stop_on_value=values and not latest,
            max_rpcs=self.config.lookup_rpcs_per_beam * width,
            max_rounds=self.config.max_lookup_rounds,
            claim_ok=self._claim_ok,
        )

    def _claim_ok(self, node_id: int, address: str) -> bool:
        """False when ``address`` proved another id (by a signed ping): a lookup does not ask
        a peer under an id it is known not to hold."""
        proved = self.verified.get(address)
        return proved is None or proved == node_id

    async def find(
        self, peer_id: int, address: str, targets: list[int], nodes_only: bool, beam: int = 0
    ) -> list[Answer]:
        """Find ``targets`` at one peer, sharing the RPC with other lookups of this turn."""
        return await self._finds.submit((peer_id, address, nodes_only, beam), targets)

    async def run_lookups(
        self, states: list[KeyLookup], *, values: bool, width: int, alpha: int = 0
    ) -> None:
        async def find(peer: int, address: str, ids: list[int]) -> list[Answer]:
            return await self.find(peer, address, ids, not values, width)

        await run_rounds(
            states,
            find=find,
            on_failure=lambda peer, address: None,  # _find_rpc already reported it
            is_blocked=self.blacklist.blocked,
            alpha=alpha or self.config.alpha,
        )

    async def lookup(
        self,
        targets: Sequence[int],
        operation: str,
        *,
        values: bool,
        latest: bool = False,
        beam: int | None = None,
    ) -> list[KeyLookup]:
        """Iterative lookup of many ids together (see :mod:`services.dht.lookup`);
        ``beam`` defaults to k (node lookups).

        A ``latest`` get in a small swarm (fewer than k contacts: the table most likely
        holds every node, so its nearest are the replica set) asks its whole beam at once
        instead of ``alpha`` peers per round: it must hear every replica anyway, so this
        costs no extra RPC and saves a round trip. In a large swarm the table's nearest are
        rarely the replicas, and asking the whole beam each round costs more RPCs, so it
        keeps ``alpha`` (figures: docs/dht.md).
        """
        width = beam or self.config.k
        states = self.start_lookups(targets, values=values, latest=latest, width=width)
        small = len(self.table) < self.config.k
        alpha = max(self.config.alpha, width) if values and latest and small else self.config.alpha
        await self.run_lookups(states, values=values, width=width, alpha=alpha)
        for state in states:
            self.metrics.lookup(operation, state.rounds, state.rpcs)
        return states

    # ------------------------------------------------------------------ put and get
    async def store_many(
        self, items: Sequence[tuple[int, Entry]], source: str = ""
    ) -> tuple[list[int], bool]:
        """Store each (key id, entry) on the ``num_replicas`` nearest nodes
        (:mod:`services.dht.replicated_store`; ``source``: the client's IP, charged for this node's
        copy). Returns the replica count per item and whether storage was full somewhere."""
        return await ReplicatedStore(self, items, source).run()

    async def get_many(self, key_ids: Sequence[int], latest: bool = False) -> list[list[Entry]]:
        """The merged live entries per key (empty list: not found); entries whose ownership
        does not hold were dropped as they arrived."""
        if not key_ids:
            return []
        keys = list(dict.fromkeys(key_ids))
        states = {
            s.target: s
            for s in await self.lookup(
                keys, "get", values=True, latest=latest, beam=self.value_beam
            )
        }
        found: dict[int, list[Entry]] = {}
        cache_plan: dict[tuple[int, str], list[tuple[int, Entry]]] = defaultdict(list)
        for key_id, state in states.items():
            merged = merge_entries(state.entries, self.clock.now())
            found[key_id] = merged
            if not merged:
                continue
            for node_id, address in state.nearest_answered(self.config.k):
                if node_id in state.holders:
                    continue
                if node_id == self.node_id:
                    with contextlib.suppress(StorageFull):
                        for e in merged:
                            self.cache.store(key_id, e)
                else:
                    cache_plan[(node_id, address)].extend((key_id, e) for e in merged)
                break
        for (node_id, address), cached in cache_plan.items():
            self._spawn(self._cache_on(node_id, address, cached))
        return [found[k] for k in key_ids]

    async def _cache_on(self, node_id: int, address: str, cached: list[tuple[int, Entry]]) -> None:
        items = [
            dht_pb2.StoreItem(key_id=id_to_bytes(k), entry=entry_to_proto(e), in_cache=True)
            for k, e in cached[: self.config.max_keys_per_request]
        ]
        with contextlib.suppress(CallError):
            await self.store_rpc(node_id, address, items)
