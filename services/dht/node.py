"""One DHT node: routing table + storage + the Kademlia operations built on lookups.

- ``store_many``: one batched lookup (nodes only) for all keys, then one ``Store`` call per
  target peer carrying every item that peer should replicate (the ``num_replicas``
  nearest answered nodes per key, this node included when it is among them).
- ``get_many``: one batched lookup with values; a plain get stops at the first hit, a
  ``latest`` get asks on until the beam has answered (in a small swarm, all at once) and
  merges (later expiration wins).
  The merged value is then cached, in the background, on the nearest answered node that
  lacked it, so popular keys are found in fewer hops.
- A peer enters the routing table only once it proved, at the address it claimed, that its
  id is the hash of a key it holds (a signed ping); a claim alone (a caller's ``sender``, an
  answer's ``peer``) only triggers that check, so a forged claim never evicts anyone.
- Peers that fail a call are removed from the routing table and blacklisted with
  exponential backoff; any call *from* a verified peer clears its blacklist entry.
- Maintenance: purge expired records, refresh buckets untouched for a while, republish
  held records not re-stored by anyone for ``republish_interval`` (so one replica
  republishes and the others skip), and re-ping the initial peers now and then
  (a restarted seed learns the swarm again; an orphaned node rejoins).
- Bootstrap retries the initial peers with backoff until one answers (containers start in
  any order), then looks up its own id to fill the table; ``joined`` is set after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import struct
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

from services.common.addresses import is_peer_address
from services.common.identity import Identity
from services.common.rejections import Rejections
from services.dht.batching import Coalescer
from services.dht.clock import DHTClock
from services.dht.config import NodeConfig
from services.dht.lookup import KeyLookup, run_rounds, start_lookups
from services.dht.protocol import PeerProtocol, entry_to_proto, node_info, proven_id
from services.dht.records import Entry, ownership_problem
from services.dht.routing import ID_BYTES, RoutingTable, id_from_bytes, id_to_bytes, random_id
from services.dht.storage import Storage, StorageFull, merge_entries
from services.dht.transport import Transport, TransportError
from services.proto import dht_pb2

log = logging.getLogger(__name__)


def _peers(infos: Iterable[dht_pb2.NodeInfo]) -> list[tuple[int, str]]:
    """(id, address) of well-formed peer infos; malformed ones (and addresses that are not
    ``host:port``: a stranger's list must not make us dial ``unix:`` sockets) are skipped."""
    peers = []
    for info in infos:
        raw = info.node_id
        if len(raw) == ID_BYTES and is_peer_address(info.address):
            peers.append((int.from_bytes(raw, "big"), info.address))
    return peers


class NullMetrics:
    """Metrics sink for nodes that export nothing (large in-process swarms)."""

    def rpc(self, method: str, code: str, seconds: float) -> None:
        pass

    def lookup(self, operation: str, rounds: int, rpcs: int) -> None:
        pass

    def republished(self, count: int) -> None:
        pass

    def verification(self, outcome: str) -> None:
        pass

    def skewed_peer(self) -> None:
        pass


class Blacklist:
    """Addresses that failed recently, each banned for base * 2^(failures-1) s (capped)."""

    def __init__(self, base: float, maximum: float) -> None:
        self.base, self.maximum = base, maximum
        self._until: dict[str, tuple[float, int]] = {}

    def fail(self, address: str) -> None:
        _, failures = self._until.get(address, (0.0, 0))
        failures += 1
        ban = min(self.base * 2 ** (failures - 1), self.maximum)
        self._until[address] = (time.monotonic() + ban, failures)

    def clear(self, address: str) -> None:
        self._until.pop(address, None)

    def blocked(self, address: str) -> bool:
        held = self._until.get(address)
        return held is not None and time.monotonic() < held[0]

    def __len__(self) -> int:
        now = time.monotonic()
        for address in [a for a, (until, n) in self._until.items() if until < now - self.maximum]:
            del self._until[address]  # long expired: forget the failure count too
        return sum(1 for until, _ in self._until.values() if until > now)


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
        self.config = config or NodeConfig()
        self.transport = transport
        self.identity = identity or Identity.generate()
        self.node_id = int.from_bytes(hashlib.sha1(self.identity.public_key).digest(), "big")
        self.trusted = trusted  # only entries owned by these keys are stored (private swarm)
        offset = self.config.simulate_clock_offset
        self.clock = DHTClock(
            self.config.max_clock_skew,
            self.config.max_clock_correction,
            source=(lambda: time.time() + offset) if offset else time.time,
        )
        self.table = RoutingTable(self.node_id, self.config.k, self.config.depth_modulo)
        self.storage = Storage(self.config.max_records, clock=self.clock.now)
        self.cache = Storage(
            self.config.max_cache_records, evict_when_full=True, clock=self.clock.now
        )
        self.blacklist = Blacklist(self.config.blacklist_base, self.config.blacklist_max)
        self.metrics = metrics or NullMetrics()
        self.rejections = rejections or Rejections("dht", None, log)
        self.clock.on_skewed = self.metrics.skewed_peer
        # addresses that proved their id by a signed ping (LRU), and those being asked
        self.verified: OrderedDict[str, int] = OrderedDict()
        self._verifying: set[str] = set()
        self._unverifiable: dict[str, float] = {}  # address -> monotonic time to ask again
        self._demote_secret = os.urandom(32)
        self.protocol = PeerProtocol(self)
        self.joined = asyncio.Event()
        self.stopping = False
        self.initial_peers: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: list[asyncio.Task[Any]] = []
        self.address = address
        self._finds: Coalescer[Any, int, Any] = Coalescer(
            self._find_rpc, self.config.max_keys_per_request, self._spawn
        )
        self._stores: Coalescer[Any, Any, Any] = Coalescer(
            self._store_rpc, self.config.max_keys_per_request, self._spawn
        )
        self.value_beam = max(self.config.value_beam or self.config.num_replicas, 1)

    # ------------------------------------------------------------------ identity
    @property
    def address(self) -> str:
        return self._address

    @address.setter
    def address(self, value: str) -> None:
        self._address = value
        self.info = node_info(self.identity, value)

    def demote_token(self, key_id: int, entry: Entry) -> bytes:
        """What a conditional store returns for an entry it stored: only that caller can
        later demote the copy (a stranger who learned the entry through Find cannot)."""
        message = id_to_bytes(key_id) + struct.pack(">d", entry.expiration)
        message += entry.owner + b"\x00" + (entry.subkey if entry.subkey is not None else b"\xff")
        return hmac.new(self._demote_secret, message, hashlib.sha256).digest()[:16]

    # ------------------------------------------------------------------ lifecycle
    async def start(self, initial_peers: Sequence[str] = ()) -> None:
        """Start bootstrap (in the background) and maintenance; see ``joined``."""
        self.initial_peers = [p for p in initial_peers if p != self.address]
        if self.initial_peers:
            self._main.append(asyncio.create_task(self._bootstrap_loop()))
        else:
            self.joined.set()
        self._main.append(asyncio.create_task(self._maintenance_loop()))

    async def stop(self) -> None:
        self.stopping = True
        tasks = [*self._main, *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ contacts
    def on_contact(self, node_id: int, address: str) -> None:
        """A peer claims ``node_id`` at ``address`` (it called us or answered). A claim
        that address already proved refreshes it in the table; any other starts a signed
        ping to that address first (:meth:`_verify`), so nobody enters the table, or evicts
        anyone, with an id they cannot prove."""
        if node_id == self.node_id or not address:
            return
        if self.verified.get(address) != node_id:
            self._verify_later(address)
            return
        self.verified.move_to_end(address)
        self.blacklist.clear(address)
        oldest = self.table.add_or_update(node_id, address)
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

    def local_entries(self, key_id: int) -> list[Entry]:
        cached = self.cache.get(key_id)
        held = self.storage.get(key_id)
        return merge_entries([*held, *cached]) if cached else held

    # ------------------------------------------------------------------ outgoing RPCs
    async def _call(self, address: str, method: str, request: Any) -> Any:
        started = time.perf_counter()
        try:
            reply = await self.transport.call(address, method, request, self.config.rpc_timeout)
        except TransportError as exc:
            self.metrics.rpc(method, exc.code, time.perf_counter() - started)
            raise
        self.metrics.rpc(method, "OK", time.perf_counter() - started)
        return reply

    def _answered(self, peer: dht_pb2.NodeInfo, address: str) -> None:
        with contextlib.suppress(ValueError):
            self.on_contact(id_from_bytes(peer.node_id), address)

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
        except TransportError:
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

    async def _find(
        self, peer_id: int, address: str, targets: list[int], nodes_only: bool, beam: int = 0
    ) -> list[tuple[list[Entry], list[tuple[int, str]]]]:
        """Find ``targets`` at one peer, sharing the RPC with other lookups of this turn."""
        return await self._finds.submit((peer_id, address, nodes_only, beam), targets)

    async def _find_rpc(
        self, dest: tuple[int, str, bool, int], targets: list[int]
    ) -> list[tuple[list[Entry], list[tuple[int, str]]]]:
        peer_id, address, nodes_only, beam = dest
        request = dht_pb2.FindRequest(
            sender=self.info,
            key_ids=[id_to_bytes(t) for t in targets],
            nodes_only=nodes_only,
            max_nearest=beam,
        )
        try:
            reply = await self._call(address, "Find", request)
        except TransportError:
            self.on_failure(peer_id, address)
            raise
        if len(reply.results) != len(targets):
            self.on_failure(peer_id, address)
            raise TransportError("INTERNAL", "peer answered the wrong number of results")
        self._answered(reply.peer, address)
        return [
            (self._believable(target, result.entries, address), _peers(result.nearest))
            for target, result in zip(targets, reply.results, strict=True)
        ]

    def _believable(
        self, key_id: int, entries: Iterable[dht_pb2.ValueEntry], source: str
    ) -> list[Entry]:
        """A peer's answer for ``key_id`` without what it could have forged: entries whose
        ownership does not hold would otherwise shadow real ones in the merge."""
        key = id_to_bytes(key_id)
        kept = []
        for e in entries:
            entry = Entry(
                e.subkey if e.HasField("subkey") else None,
                e.value,
                e.expiration,
                e.owner,
                e.signature,
            )
            problem = ownership_problem(key, entry, self.trusted)
            if problem:
                self.rejections.reject(problem, "dropped an entry a peer returned", source)
                continue
            kept.append(entry)
        return kept

    # ------------------------------------------------------------------ lookups
    def _start(
        self, targets: Sequence[int], *, values: bool, latest: bool, width: int
    ) -> list[KeyLookup]:
        return start_lookups(
            targets,
            self_id=self.node_id,
            self_address=self.address,
            local=self.local_entries if values else None,
            initial=lambda t: self.table.nearest(t, self.config.k),
            is_blocked=self.blacklist.blocked,
            k=width,
            stop_on_value=values and not latest,
        )

    async def _rounds(
        self, states: list[KeyLookup], *, values: bool, width: int, alpha: int = 0
    ) -> None:
        async def find(peer: int, address: str, ids: list[int]) -> Any:
            return await self._find(peer, address, ids, nodes_only=not values, beam=width)

        await run_rounds(
            states,
            find=find,
            on_failure=lambda peer, address: None,  # _find already reported it
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
        costs no extra RPC and saves a round trip (benchmark mode A: get 0.26 s instead of
        0.29-0.31 s, same RPCs per round). In a large swarm the table's nearest are rarely
        the replicas, and asking the whole beam each round cost 29% more RPCs (mode B: 11.1
        instead of 8.6 per latest get), so it keeps ``alpha``.
        """
        width = beam or self.config.k
        states = self._start(targets, values=values, latest=latest, width=width)
        small = len(self.table) < self.config.k
        alpha = max(self.config.alpha, width) if values and latest and small else self.config.alpha
        await self._rounds(states, values=values, width=width, alpha=alpha)
        for state in states:
            self.metrics.lookup(operation, state.rounds, state.rpcs)
        return states

    async def store_many(self, items: Sequence[tuple[int, Entry]]) -> tuple[list[int], bool]:
        """Store each (key id, entry) on the ``num_replicas`` nearest nodes.

        The store doubles as the lookup's last step: each item goes first, as a
        conditional ``Store`` (``replicas`` set), to the ``num_replicas`` nearest nodes of
        the routing table. Their replies carry their own nearest peers, so when nobody
        names a nearer node the replica set is confirmed and the put took one round trip
        and ``num_replicas`` RPCs instead of a lookup followed by the stores. A callee that
        knows ``num_replicas`` nodes nearer the key declines (it is not a replica); when
        replies name nearer nodes the lookup goes on with ``Find`` rounds, and the final
        replica set members that did not store yet get a plain ``Store``; a node that
        stored in the first step but was displaced by a nearer node (one that neither it
        nor this node knew) is told to ``demote`` its copy to a cached one, so the
        replica count stays exact. Trade-off: where tables rarely hold the exact replica
        set (large swarms) the first step mostly costs ``num_replicas`` extra RPCs.

        Returns the replica count per item and whether storage was full somewhere.
        """
        counts = [0] * len(items)
        if not items:
            return counts, False
        replicas = self.config.num_replicas
        by_key: dict[int, list[int]] = defaultdict(list)
        for index, (key_id, _) in enumerate(items):
            by_key[key_id].append(index)
        states = {
            s.target: s
            for s in self._start(list(by_key), values=False, latest=False, width=self.value_beam)
        }
        done: set[tuple[int, int]] = set()  # (node id, item index) answered, not declined
        # (node id, item index) stored -> (address, the token that lets us demote it)
        accepted: dict[tuple[int, int], tuple[str, bytes]] = {}
        full = False

        # step 1: conditional stores on the replica set the routing table suggests
        offers: dict[tuple[int, str], list[KeyLookup]] = defaultdict(list)
        for state in states.values():
            picks = [i for i in state.beam()[:replicas] if i != self.node_id]
            if picks:
                state.rounds += 1
            for node_id in picks:
                state.queried.add(node_id)
                state.rpcs += 1
                offers[(node_id, state.candidates[node_id])].append(state)

        async def offer(node_id: int, address: str, group: list[KeyLookup]) -> None:
            nonlocal full
            indices = [i for state in group for i in by_key[state.target]]
            try:
                answers = await self._stores.submit(
                    (node_id, address, replicas), self._store_items(items, indices)
                )
            except TransportError as exc:
                if exc.code != "RESOURCE_EXHAUSTED":
                    for state in group:
                        state.drop(node_id)
                    return
                full = True  # it answered: a replica that is full
                for state in group:
                    state.answer(node_id, address, [], [], self.blacklist.blocked)
                done.update((node_id, i) for i in indices)
                return
            for index, (stored, declined, nearest, token) in zip(indices, answers, strict=True):
                state = states[items[index][0]]
                state.answer(node_id, address, [], nearest, self.blacklist.blocked)
                if not declined:
                    done.add((node_id, index))
                    counts[index] += stored
                    if stored:
                        accepted[(node_id, index)] = (address, token)

        await asyncio.gather(*(offer(n, a, group) for (n, a), group in offers.items()))
        for state in states.values():
            state.end_round()

        # the lookup goes on only where replies named nearer nodes (or peers failed)
        await self._rounds(list(states.values()), values=False, width=self.value_beam)
        for state in states.values():
            self.metrics.lookup("store", state.rounds, state.rpcs)

        # step 2: plain stores on final replicas that have not stored yet
        plan: dict[tuple[int, str], list[int]] = defaultdict(list)
        for index, (key_id, entry) in enumerate(items):
            for node_id, address in states[key_id].nearest_answered(replicas):
                if node_id == self.node_id:
                    try:
                        counts[index] += self.storage.store(key_id, entry)
                    except StorageFull:
                        full = True
                elif (node_id, index) not in done:
                    plan[(node_id, address)].append(index)

        async def send(node_id: int, address: str, indices: list[int]) -> bool:
            try:
                answers = await self._stores.submit(
                    (node_id, address, 0), self._store_items(items, indices)
                )
            except TransportError as exc:
                return exc.code == "RESOURCE_EXHAUSTED"
            for i, (stored, _, _, _) in zip(indices, answers, strict=True):
                counts[i] += stored
            return False

        # step 3 (rare): step-1 holders the lookup displaced keep a cached copy only
        final = {
            (node_id, index)
            for index, (key_id, _) in enumerate(items)
            for node_id, _ in states[key_id].nearest_answered(replicas)
        }
        demote: dict[tuple[int, str], list[tuple[int, bytes]]] = defaultdict(list)
        for (node_id, index), (address, token) in accepted.items():
            if (node_id, index) not in final:
                demote[(node_id, address)].append((index, token))
                counts[index] -= 1

        async def send_demote(node_id: int, address: str, held: list[tuple[int, bytes]]) -> None:
            store_items = self._store_items(items, [index for index, _ in held])
            for item, (_, token) in zip(store_items, held, strict=True):
                item.demote, item.demote_token = True, token
            with contextlib.suppress(TransportError):
                await self._stores.submit((node_id, address, 0), store_items)

        results = await asyncio.gather(
            *(send(n, a, ix) for (n, a), ix in plan.items()),
            *(send_demote(n, a, ix) for (n, a), ix in demote.items()),
        )
        return counts, full or any(r is True for r in results)

    @staticmethod
    def _store_items(
        items: Sequence[tuple[int, Entry]], indices: list[int]
    ) -> list[dht_pb2.StoreItem]:
        return [
            dht_pb2.StoreItem(key_id=id_to_bytes(items[i][0]), entry=entry_to_proto(items[i][1]))
            for i in indices
        ]

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
        with contextlib.suppress(TransportError):
            await self._stores.submit((node_id, address, 0), items)

    async def _store_rpc(
        self, dest: tuple[int, str, int], items: list[dht_pb2.StoreItem]
    ) -> list[tuple[bool, bool, list[tuple[int, str]], bytes]]:
        """One Store call (conditional when ``replicas``); per item (stored, declined,
        nearest peers, demote token). A peer that is unreachable or too slow is reported
        failed."""
        node_id, address, replicas = dest
        request = dht_pb2.StoreRequest(
            sender=self.info, items=items, replicas=replicas, dht_time=self.clock.now()
        )
        try:
            reply = await self._call(address, "Store", request)
        except TransportError as exc:
            if exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"):
                self.on_failure(node_id, address)
            raise
        self._answered(reply.peer, address)
        if len(reply.stored) != len(items):
            raise TransportError("INTERNAL", "peer answered the wrong number of flags")
        if not replicas:
            return [(ok, False, [], b"") for ok in reply.stored]
        if len(reply.declined) != len(items) or len(reply.nearest) != len(items):
            raise TransportError("INTERNAL", "peer answered the wrong number of results")
        tokens = list(reply.demote_tokens)
        if len(tokens) != len(items):
            tokens = [b""] * len(items)  # nothing to demote with: copies stay replicas
        return [
            (ok, declined, _peers(result.nearest), token)
            for ok, declined, result, token in zip(
                reply.stored, reply.declined, reply.nearest, tokens, strict=True
            )
        ]

    # ------------------------------------------------------------------ background
    async def _bootstrap_loop(self) -> None:
        delay = 0.2
        while not self.stopping:
            if await self._contact_initial_peers():
                await self.lookup([self.node_id], "bootstrap", values=False)
                self.joined.set()
                log.info(
                    "joined the DHT",
                    extra={"address": self.address, "routing_table_size": len(self.table)},
                )
                return
            log.info(
                "initial peers not reachable yet, retrying",
                extra={"peers": ",".join(self.initial_peers), "retry_in_s": delay},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.bootstrap_backoff_max)

    async def _contact_initial_peers(self) -> bool:
        """Ping every initial peer (a fresh dial each time, so DNS is resolved again)."""
        replies = await asyncio.gather(*(self.ping(p) for p in self.initial_peers))
        return any(r is not None for r in replies)

    async def _reconnect_seeds(self) -> None:
        """Ping the initial peers again (a handful of pings per interval). A restarted seed
        (no initial peers of its own, maybe a new id) learns the swarm from these pings, so
        nodes can join through it again; a node whose table emptied rejoins."""
        was_empty = not len(self.table)
        replies = await asyncio.gather(*(self.ping(p) for p in self.initial_peers))
        if was_empty and any(r is not None for r in replies):
            await self.lookup([self.node_id], "bootstrap", values=False)

    async def _maintenance_loop(self) -> None:
        config = self.config
        next_republish = time.monotonic() + config.republish_interval
        next_seed_check = time.monotonic() + config.seed_ping_interval
        while not self.stopping:
            await asyncio.sleep(config.maintenance_interval)
            try:
                self.storage.purge()
                self.cache.purge()
                now = time.monotonic()
                if self.joined.is_set() and self.initial_peers and now >= next_seed_check:
                    next_seed_check = now + config.seed_ping_interval
                    await self._reconnect_seeds()
                stale = self.table.stale_buckets(config.refresh_interval)
                if stale and len(self.table):
                    targets = [random_id(b.lower, b.upper) for b in stale]
                    await self.lookup(targets, "refresh", values=False)
                    for bucket in stale:
                        bucket.last_updated = time.monotonic()
                if now >= next_republish:
                    next_republish = now + config.republish_interval
                    await self.republish()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("maintenance step failed")

    async def republish(self, force: bool = False) -> int:
        """Store held records again on the current nearest nodes; returns items sent.

        Records somebody stored here within the last ``republish_interval`` are skipped
        (another replica just republished them), unless ``force``.
        """
        now, wall = time.monotonic(), self.clock.now()
        items = []
        for key_id, entries in self.storage.items():
            last = self.storage.last_stored.get(key_id, 0.0)
            if not force and now - last < self.config.republish_interval:
                continue
            items.extend((key_id, e) for e in entries if e.expiration > wall + 1.0)
        batch = self.config.max_keys_per_request
        for start in range(0, len(items), batch):
            with contextlib.suppress(StorageFull):
                await self.store_many(items[start : start + batch])
        self.metrics.republished(len(items))
        return len(items)
