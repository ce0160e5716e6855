"""The store protocol: put each item on the ``num_replicas`` nodes nearest its key.

The store doubles as the lookup's last step (:class:`ReplicatedStore`):
1. each item goes first, as a *conditional* ``Store`` (``replicas`` set), to the
   ``num_replicas`` nearest nodes of the routing table. A callee that knows ``num_replicas``
   nodes nearer the key declines (it is not a replica); every callee returns its own nearest
   peers, and a demote token for what it stored. When nobody names a nearer node the replica
   set is confirmed: one round trip and ``num_replicas`` RPCs instead of a lookup followed by
   the stores;
2. otherwise the lookup goes on with ``Find`` rounds, and the final replica set members that
   did not store yet get a plain ``Store`` (this node stores its own copy when it is one);
3. a node that stored in step 1 but was displaced by a nearer node (one neither it nor this
   node knew) is told to ``demote`` its copy to a cached one, with the token it gave, so the
   replica count stays exact and nobody else can strip a replica.

Trade-off: where tables rarely hold the exact replica set (large swarms) step 1 mostly costs
``num_replicas`` extra RPCs; in small and dense swarms it halves the RPCs of a store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from services.common.errors import CallError
from services.dht.lookup import KeyLookup
from services.dht.records import Entry
from services.dht.storage import StorageFull
from services.dht.store_rpc import store_items

if TYPE_CHECKING:
    from services.dht.node import DHTNode

Items = Sequence[tuple[int, Entry]]


class ReplicatedStore:
    """One store of many items; :meth:`run` returns (replicas per item, storage full)."""

    def __init__(self, node: DHTNode, items: Items, source: str = "") -> None:
        self.node = node
        self.items = items
        self.source = source  # the client's IP: this node's own copy is charged to it
        self.replicas = node.config.num_replicas
        self.counts = [0] * len(items)
        self.full = False
        self.by_key: dict[int, list[int]] = defaultdict(list)
        for index, (key_id, _) in enumerate(items):
            self.by_key[key_id].append(index)
        self.states: dict[int, KeyLookup] = {}
        self.done: set[tuple[int, int]] = set()  # (node id, item index) answered, not declined
        # (node id, item index) stored in step 1 -> (address, the token to demote it)
        self.accepted: dict[tuple[int, int], tuple[str, bytes]] = {}

    async def run(self) -> tuple[list[int], bool]:
        if not self.items:
            return self.counts, False
        node = self.node
        self.states = {
            s.target: s
            for s in node.start_lookups(list(self.by_key), values=False, width=node.value_beam)
        }
        await self._offer_to_table_replicas()
        states = list(self.states.values())
        await node.run_lookups(states, values=False, width=node.value_beam)
        for state in states:
            node.metrics.lookup("store", state.rounds, state.rpcs)
        final = self._final_replicas()
        results = await asyncio.gather(
            *(self._store(n, a, ix) for (n, a), ix in self._missing(final).items()),
            *(self._demote(n, a, held) for (n, a), held in self._displaced(final).items()),
        )
        return self.counts, self.full or any(r is True for r in results)

    # step 1 -------------------------------------------------------------------------------
    async def _offer_to_table_replicas(self) -> None:
        offers: dict[tuple[int, str], list[KeyLookup]] = defaultdict(list)
        for state in self.states.values():
            picks = [i for i in state.beam()[: self.replicas] if i != self.node.node_id]
            if picks:
                state.rounds += 1
            for node_id in picks:
                state.queried.add(node_id)
                state.rpcs += 1
                offers[(node_id, state.candidates[node_id])].append(state)
        await asyncio.gather(*(self._offer(n, a, group) for (n, a), group in offers.items()))
        for state in self.states.values():
            state.end_round()

    async def _offer(self, node_id: int, address: str, group: list[KeyLookup]) -> None:
        node = self.node
        indices = [i for state in group for i in self.by_key[state.target]]
        try:
            answers = await node.store_rpc(
                node_id, address, store_items(self.items, indices), self.replicas
            )
        except CallError as exc:
            if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                for state in group:
                    state.drop(node_id)
                return
            self.full = True  # it answered: a replica that is full
            for state in group:
                state.answer(node_id, address, [], [], node.blacklist.blocked)
            self.done.update((node_id, i) for i in indices)
            return
        for index, (stored, declined, nearest, token) in zip(indices, answers, strict=True):
            state = self.states[self.items[index][0]]
            state.answer(node_id, address, [], nearest, node.blacklist.blocked)
            if not declined:
                self.done.add((node_id, index))
                self.counts[index] += stored
                if stored:
                    self.accepted[(node_id, index)] = (address, token)

    # steps 2 and 3 ------------------------------------------------------------------------
    def _final_replicas(self) -> set[tuple[int, int]]:
        return {
            (node_id, index)
            for index, (key_id, _) in enumerate(self.items)
            for node_id, _ in self.states[key_id].nearest_answered(self.replicas)
        }

    def _missing(self, final: set[tuple[int, int]]) -> dict[tuple[int, str], list[int]]:
        """Final replicas that have not stored yet (this node stores its copy right away)."""
        node = self.node
        plan: dict[tuple[int, str], list[int]] = defaultdict(list)
        for index, (key_id, entry) in enumerate(self.items):
            for node_id, address in self.states[key_id].nearest_answered(self.replicas):
                if node_id == node.node_id:
                    try:
                        self.counts[index] += node.storage.store(key_id, entry, source=self.source)
                    except StorageFull:
                        self.full = True
                elif (node_id, index) not in self.done:
                    plan[(node_id, address)].append(index)
        return plan

    def _displaced(
        self, final: set[tuple[int, int]]
    ) -> dict[tuple[int, str], list[tuple[int, bytes]]]:
        demote: dict[tuple[int, str], list[tuple[int, bytes]]] = defaultdict(list)
        for (node_id, index), (address, token) in self.accepted.items():
            if (node_id, index) not in final:
                demote[(node_id, address)].append((index, token))
                self.counts[index] -= 1
        return demote

    async def _store(self, node_id: int, address: str, indices: list[int]) -> bool:
        """A plain store; True when the callee was full."""
        try:
            answers = await self.node.store_rpc(node_id, address, store_items(self.items, indices))
        except CallError as exc:
            return exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        for i, (stored, _, _, _) in zip(indices, answers, strict=True):
            self.counts[i] += stored
        return False

    async def _demote(self, node_id: int, address: str, held: list[tuple[int, bytes]]) -> None:
        items = store_items(self.items, [index for index, _ in held], demote=True)
        for item, (_, token) in zip(items, held, strict=True):
            item.demote_token = token
        with contextlib.suppress(CallError):
            await self.node.store_rpc(node_id, address, items)
