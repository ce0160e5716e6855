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
bootstrap and upkeep :mod:`services.dht.maintenance`. Each peer RPC, the request this node
builds and the handler that answers it, is one module: :mod:`services.dht.ping_rpc`,
:mod:`services.dht.find_rpc`, :mod:`services.dht.store_rpc`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from services.common.errors import CallError
from services.common.identity import Identity
from services.common.rejections import Rejections
from services.dht import find_rpc, maintenance, ping_rpc, store_rpc
from services.dht.blacklist import Blacklist
from services.dht.clock import DHTClock
from services.dht.coalescer import Coalescer
from services.dht.config import NodeConfig
from services.dht.find_rpc import Answer
from services.dht.lookup import KeyLookup, run_rounds, start_lookups
from services.dht.metrics import NullMetrics
from services.dht.peer_state import PeerState
from services.dht.protocol import PeerProtocol
from services.dht.records import Entry
from services.dht.replicated_store import ReplicatedStore
from services.dht.replication import hand_off
from services.dht.routing import id_from_bytes, id_to_bytes
from services.dht.storage import StorageFull, merge_entries
from services.dht.store_rpc import StoreAnswer, store_items
from services.dht.transport import Transport
from services.proto import dht_pb2

log = logging.getLogger(__name__)


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
            partial(find_rpc.send, self), config.max_keys_per_request, self._spawn
        )
        self._stores: Coalescer[Any, Any, Any] = Coalescer(
            partial(store_rpc.send, self), config.max_keys_per_request, self._spawn
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

    def proved(self, address: str, node_id: int) -> None:
        """``address`` signed our ping nonce as ``node_id`` (:mod:`services.dht.ping_rpc`)."""
        self.verified[address] = node_id
        self.verified.move_to_end(address)
        while len(self.verified) > 4 * self.config.k * 64:
            self.verified.popitem(last=False)
        self._unverifiable.pop(address, None)

    def unproved(self, address: str) -> None:
        """``address`` answered a ping without proving its id: not asked again for a while."""
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

    def answered(self, peer: dht_pb2.NodeInfo, address: str) -> None:
        with contextlib.suppress(ValueError):
            self.on_contact(id_from_bytes(peer.node_id), address)

    # ------------------------------------------------------------------ outgoing RPCs
    async def call(self, address: str, method: str, request: Any) -> Any:
        """One ``DHTPeer`` call through the transport, timed and counted by outcome."""
        started = time.perf_counter()
        try:
            reply = await self.transport.call(address, method, request, self.config.rpc_timeout)
        except CallError as exc:
            self.metrics.rpc(method, exc.code.name, time.perf_counter() - started)
            raise
        self.metrics.rpc(method, "OK", time.perf_counter() - started)
        return reply

    async def ping(self, address: str) -> dht_pb2.PingResponse | None:
        """Ping ``address``: None unless it answers and proves its id (:func:`ping_rpc.ping`)."""
        return await ping_rpc.ping(self, address)

    async def store_rpc(
        self, node_id: int, address: str, items: list[dht_pb2.StoreItem], replicas: int = 0
    ) -> list[StoreAnswer]:
        """Store ``items`` at one peer (conditional when ``replicas``), sharing the RPC with
        other stores to that peer in this loop turn; per item (stored, declined, nearest
        peers, demote token)."""
        return await self._stores.submit((node_id, address, replicas), items)

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
            on_failure=lambda peer, address: None,  # find_rpc.send already reported it
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
        batch = cached[: self.config.max_keys_per_request]
        with contextlib.suppress(CallError):
            await self.store_rpc(
                node_id, address, store_items(batch, range(len(batch)), cache=True)
            )
