"""One round of looking at the swarm: what the DHT holds, checked against the peers themselves.

A round (every ``period`` seconds):

1. one DHT get of the well-known keys ``_dmoe.grids`` (expert servers: grid prefix, shape,
   address) and ``_dmoe.trainers`` (trainers), while ``DHT/NodeStatus`` is asked of the
   initial DHT nodes and, breadth first, of the peers they name;
2. per grid (the ``--prefixes`` given, then those announced), the walk a beam search makes:
   ``ffn.`` -> live first coordinates, ``ffn.3.`` -> live second coordinates and the servers
   declaring them, one batched get per dimension;
3. ``Expert/Info`` of the uids each server declares (a bounded number per round, rotating),
   which proves the server answers, with the key that signed its declarations; and
   ``Trainer/Status`` of every trainer announced.

A replica of an expert is *alive* when its server answered this round, with the public key
that owns the declaration, and did not deny hosting the uid. Everything is bounded: grids,
cells, servers, trainers, DHT nodes and Info calls per round (:class:`Limits`), every call
has a deadline, and anything malformed is skipped and counted in
``dmoe_explorer_rejected_total{reason}``.

Modules: :mod:`~services.explorer.dht_reading` (1.-2., the DHT half),
:mod:`~services.explorer.probing` (1. and 3., the peers), :mod:`~services.explorer.snapshot`
(the expert and grid rows from both); this one runs a round and assembles the snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from services.common.announcements import GRIDS_KEY, TRAINERS_KEY
from services.common.rejections import Rejections
from services.dht.client import DHTClient
from services.explorer.dht_reading import DHT_ERRORS, DHTReader
from services.explorer.limits import Limits
from services.explorer.peers import Peers
from services.explorer.probing import Prober
from services.explorer.rows import Grid, ServerSeen, server_row, text
from services.explorer.snapshot import Steps, expert_rows, server_keys

log = logging.getLogger(__name__)
__all__ = ["Collector", "Limits"]


class Collector:
    """Runs rounds against one swarm; keeps what rates need between rounds (bounded)."""

    def __init__(
        self,
        dht: DHTClient,
        peers: Peers,
        initial_peers: list[str],
        prefixes: list[str],
        limits: Limits,
        rejections: Rejections,
        period: float,
    ) -> None:
        self.dht = dht
        self.peers = peers
        self.limits = limits
        self.period = period
        self.reader = DHTReader(dht, prefixes, limits, rejections)
        self.prober = Prober(peers, initial_peers, limits, rejections)
        self._round = 0
        self._steps: Steps = {}  # (address, uid) -> t, steps

    async def round(self) -> dict[str, Any]:
        """Look at the swarm once; the snapshot ``/api/swarm`` serves."""
        started = time.time()
        self._round += 1
        errors: list[str] = []
        reader, prober = self.reader, self.prober
        nodes_task = asyncio.ensure_future(prober.dht_nodes())
        try:
            try:
                found = await self.dht.get([GRIDS_KEY, TRAINERS_KEY], latest=True)
            except DHT_ERRORS as exc:
                errors.append(f"DHT: {text(exc)}")
                found = {}
            announced = reader.grid_announcements(found.get(GRIDS_KEY))
            grids = reader.choose_grids(announced)
            await asyncio.gather(*(reader.walk(g) for g in grids))
            servers = prober.servers(grids, announced)
            trainers = reader.trainer_announcements(found.get(TRAINERS_KEY))
            now = time.time()
            probes, trainer_rows = await asyncio.gather(
                prober.probe(servers, self._round),
                asyncio.gather(*(prober.trainer_row(a, o, now) for a, o, _e in trainers)),
            )
            dht_nodes = await nodes_task
        finally:
            nodes_task.cancel()
            await self.peers.end_round()
        prober.keep_trainers({a.address for a, _o, _e in trainers})
        return self._snapshot(grids, servers, probes, trainer_rows, dht_nodes, errors, started)

    def _snapshot(
        self,
        grids: list[Grid],
        servers: dict[str, ServerSeen],
        probes: dict[str, dict[str, Any]],
        trainers: list[dict[str, Any]],
        dht_nodes: list[dict[str, Any]],
        errors: list[str],
        started: float,
    ) -> dict[str, Any]:
        now = time.time()
        keys = server_keys(probes)
        experts, grid_rows, self._steps = expert_rows(
            grids, probes, keys, self._steps, self.limits.max_cells, now
        )
        server_rows = [
            server_row(seen, probes.get(address, {}), keys.get(address, b""))
            for address, seen in sorted(servers.items())
        ]
        return {
            "updated": now,
            "round": self._round,
            "round_seconds": round(now - started, 3),
            "period": self.period,
            "errors": errors,
            "grids": grid_rows,
            "experts": experts,
            "servers": server_rows,
            "trainers": trainers,
            "dht_nodes": dht_nodes,
        }
