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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

from services.common.addresses import is_peer_address
from services.common.announcements import (
    GRIDS_KEY,
    PREFIX_RE,
    TRAINERS_KEY,
    GridAnnouncement,
    TrainerAnnouncement,
    parse_grid,
    parse_trainer,
)
from services.common.errors import CallError
from services.common.expert_keys import parse_coordinate, prefix_key
from services.common.rejections import Rejections
from services.dht.client import DHTClient, DHTUnavailable, Found
from services.explorer.peers import CallFailed, Peers
from services.explorer.rows import (
    Grid,
    Replica,
    ServerSeen,
    extra_fields,
    fingerprint,
    finite,
    layout,
    server_row,
    text,
)

log = logging.getLogger(__name__)

NOT_PROBED: Any = object()  # a uid whose server was not asked about it this round
GET_CHUNK = 256  # keys per DHT get
DHT_CONCURRENCY = 8  # DHT gets in flight at once
# what a DHT get raises when the DHT cannot answer (a node refusing past its admission limits
# answers RESOURCE_EXHAUSTED, which the client passes on)
DHT_ERRORS = (DHTUnavailable, ValueError, CallError)


@dataclass(frozen=True)
class Limits:
    """What one round may look at; everything past these is left out (and said so)."""

    max_grids: int = 16
    max_cells: int = 4096  # uids per grid: a declared shape larger is drawn sparse
    max_servers: int = 512
    max_trainers: int = 256
    max_dht_nodes: int = 64
    max_probes: int = 1024  # Expert/Info calls per round, all servers together


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
        self.initial_peers = list(initial_peers)
        self.prefixes = [p for p in prefixes if PREFIX_RE.match(p)]
        self.limits = limits
        self.rejections = rejections
        self.period = period
        self._round = 0
        self._dht_slots = asyncio.Semaphore(DHT_CONCURRENCY)
        self._steps: dict[tuple[str, str], tuple[float, int]] = {}  # (address, uid) -> t, steps
        self._samples: dict[str, tuple[float, int]] = {}  # trainer address -> t, samples seen

    def _reject(self, reason: str, message: str, source: str = "", **fields: object) -> None:
        self.rejections.reject(reason, message, source, **fields)

    # ---------------------------------------------------------------- the DHT
    async def _get(self, keys: list[str]) -> dict[str, Found]:
        """Many keys, in chunks, concurrently; keys whose chunk failed are missing."""
        chunks = [keys[i : i + GET_CHUNK] for i in range(0, len(keys), GET_CHUNK)]

        async def get(chunk: list[str]) -> dict[str, Found]:
            async with self._dht_slots:
                return cast(dict[str, Found], await self.dht.get(chunk, latest=True))

        answers = await asyncio.gather(*(get(chunk) for chunk in chunks), return_exceptions=True)
        found: dict[str, Found] = {}
        for answer in answers:
            if isinstance(answer, BaseException):
                if not isinstance(answer, DHT_ERRORS):
                    raise answer
                continue
            found.update(answer)
        return found

    def _owned(self, found: Found, key: str) -> list[tuple[bytes, bytes, float, bytes]]:
        """(subkey, value, expiration, owner) of the owned entries of a dictionary."""
        if not isinstance(found, dict):
            return []
        entries = []
        for subkey, values in found.items():
            for v in values:
                if not v.owner:
                    self._reject("unowned", "skipped an unowned entry", key=key[:100])
                    continue
                entries.append((subkey, v.value, v.expiration, v.owner))
        return entries

    async def _walk(self, grid: Grid) -> None:
        """The uids under ``grid.prefix`` and the servers declaring each (module doc, 2.)."""
        depth = len(grid.declared_shape) if grid.declared_shape else None
        level = [prefix_key(grid.prefix)]
        for dim in itertools.count():
            if not level or dim >= 8:
                return
            found = await self._get(level)
            following: list[str] = []
            for key in level:
                leaf = depth is not None and dim == depth - 1
                entries = self._owned(found.get(key), key)
                if entries and depth is None and dim > 0:
                    grid.uids.pop(key[:-1], None)  # no declared shape: a uid has no children
                for subkey, value, expiration, owner in entries:
                    coord = parse_coordinate(subkey)
                    if coord is None:
                        self._reject("bad_coordinate", "skipped a non-coordinate subkey",
                                     key=key[:100])  # fmt: skip
                        continue
                    child = f"{key}{coord}"
                    if depth is None or leaf:
                        replica = self._replica(value, owner, expiration)
                        if replica is not None and self._room(grid, child):
                            grid.uids.setdefault(child, []).append(replica)
                    if not leaf and child + "." not in following:
                        if len(following) >= self.limits.max_cells:
                            grid.truncated = True
                            continue
                        following.append(child + ".")
            level = following

    def _room(self, grid: Grid, uid: str) -> bool:
        if uid in grid.uids and len(grid.uids[uid]) < 64:
            return True
        if uid not in grid.uids and len(grid.uids) < self.limits.max_cells:
            return True
        grid.truncated = True
        return False

    def _replica(self, value: bytes, owner: bytes, expiration: float) -> Replica | None:
        try:
            address = value.decode("ascii")
        except UnicodeDecodeError:
            address = ""
        if not is_peer_address(address):
            self._reject("bad_address", "skipped a declaration that is no host:port")
            return None
        return Replica(address, owner, expiration)

    # ---------------------------------------------------------------- announcements
    def _grid_announcements(self, found: Found) -> list[tuple[GridAnnouncement, bytes, float]]:
        kept = []
        for subkey, value, expiration, owner in self._owned(found, GRIDS_KEY):
            announcement, problem = parse_grid(subkey, value)
            if announcement is None:
                self._reject(problem, "skipped a grid announcement", reason_detail=problem)
                continue
            kept.append((announcement, owner, expiration))
        kept.sort(key=lambda a: -a[2])
        return kept[: self.limits.max_servers * 4]

    def _trainer_announcements(
        self, found: Found
    ) -> list[tuple[TrainerAnnouncement, bytes, float]]:
        kept: dict[tuple[str, bytes], tuple[TrainerAnnouncement, bytes, float]] = {}
        for subkey, value, expiration, owner in self._owned(found, TRAINERS_KEY):
            announcement, problem = parse_trainer(subkey, value)
            if announcement is None:
                self._reject(problem, "skipped a trainer announcement")
                continue
            slot = (announcement.address, owner)
            if slot not in kept or kept[slot][2] < expiration:
                kept[slot] = (announcement, owner, expiration)
        ordered = sorted(kept.values(), key=lambda a: (a[0].run_id, a[0].address))
        if len(ordered) > self.limits.max_trainers:
            self._reject("over_limit", "more trainers announced than --max-trainers")
        return ordered[: self.limits.max_trainers]

    def _choose_grids(self, announced: list[tuple[GridAnnouncement, bytes, float]]) -> list[Grid]:
        shapes: dict[str, Counter[tuple[int, ...]]] = {}
        for announcement, _owner, _exp in announced:
            shapes.setdefault(announcement.prefix, Counter())[announcement.shape] += 1
        by_servers = sorted(shapes, key=lambda p: (-sum(shapes[p].values()), p))
        names = list(dict.fromkeys([*self.prefixes, *by_servers]))
        if len(names) > self.limits.max_grids:
            self._reject("over_limit", "more grids announced than --max-grids")
        grids = []
        for name in names[: self.limits.max_grids]:
            votes = shapes.get(name)
            shape = votes.most_common(1)[0][0] if votes else None
            grids.append(Grid(name, shape))
        return grids

    # ---------------------------------------------------------------- peers
    async def _dht_nodes(self) -> list[dict[str, Any]]:
        """NodeStatus of the initial nodes, then of the peers they name (breadth first)."""
        seen_ids: set[bytes] = set()
        asked: set[str] = set()
        rows: list[dict[str, Any]] = []
        level = list(dict.fromkeys(self.initial_peers))
        while level and len(asked) < self.limits.max_dht_nodes:
            level = level[: self.limits.max_dht_nodes - len(asked)]
            asked.update(level)
            answers = await asyncio.gather(*(self._node_row(a) for a in level))
            following: list[str] = []
            for row, peers in answers:
                node_id = row.pop("_id", b"")
                if node_id and node_id in seen_ids:
                    continue  # the same node under another name (a DNS name, then its IP)
                if node_id:
                    seen_ids.add(node_id)
                rows.append(row)
                for peer in peers:
                    if peer not in asked and peer not in following:
                        following.append(peer)
            level = following
        return rows

    async def _node_row(self, address: str) -> tuple[dict[str, Any], list[str]]:
        row: dict[str, Any] = {"address": address, "reachable": False}
        try:
            reply, seconds = await self.peers.node_status(address)
        except CallFailed as exc:
            row["error"] = text(exc)
            return row, []
        peers = []
        for info in reply.peers[:64]:
            if is_peer_address(info.address):
                peers.append(info.address)
            else:
                self._reject("bad_address", "skipped a DHT peer that is no host:port")
        node = reply.node
        row.update(
            reachable=True,
            announced_address=node.address if is_peer_address(node.address) else "",
            node_id=node.node_id.hex()[:40],
            fingerprint=fingerprint(node.public_key[:64]),
            joined=reply.joined,
            routing_table_size=max(0, reply.routing_table_size),
            stored_records=max(0, reply.stored_records),
            peers=len(reply.peers),
            clock_correction=finite(reply.clock_correction),
            latency_ms=round(seconds * 1000, 1),
            _id=node.node_id[:64],
        )
        return row, peers

    def _servers(
        self, grids: list[Grid], announced: list[tuple[GridAnnouncement, bytes, float]]
    ) -> dict[str, ServerSeen]:
        servers: dict[str, ServerSeen] = {}
        declared = Counter(r.address for g in grids for rs in g.uids.values() for r in rs)
        wanted = {a for a, _n in declared.most_common(self.limits.max_servers)}
        for grid in grids:
            for uid, replicas in grid.uids.items():
                for replica in replicas:
                    if replica.address not in wanted:
                        continue
                    seen = servers.setdefault(replica.address, ServerSeen(replica.address))
                    if len(seen.owners) < 64:
                        seen.owners.add(replica.owner)
                    seen.uids[uid] = None
        for announcement, owner, _exp in announced:
            address = announcement.address
            if address not in servers and len(servers) >= self.limits.max_servers:
                continue
            seen = servers.setdefault(address, ServerSeen(address))
            if seen.announcement is None:
                seen.announcement, seen.announced_by = announcement, owner
        if len(declared) > self.limits.max_servers:
            self._reject("over_limit", "more servers than --max-servers")
        return servers

    async def _probe_server(self, seen: ServerSeen, quota: int) -> dict[str, Any]:
        """Info of up to ``quota`` of the server's uids (rotating by round)."""
        uids = list(seen.uids)
        if uids and len(uids) > quota:
            start = (self._round * quota) % len(uids)
            uids = (uids[start:] + uids[:start])[:quota]
        result: dict[str, Any] = {"reachable": False, "answers": {}, "error": ""}
        if not uids:
            uids = [f"{seen.announcement.prefix}.0"] if seen.announcement else []
        replies = await asyncio.gather(
            *(self.peers.info(seen.address, uid) for uid in uids), return_exceptions=True
        )
        latencies = []
        for uid, reply in zip(uids, replies, strict=True):
            if isinstance(reply, CallFailed):
                result["answers"][uid] = None  # not a live replica this round
                if str(reply).startswith("NOT_FOUND"):
                    result["reachable"] = True  # the server says it does not host it
                else:
                    result["error"] = text(reply)
                continue
            if isinstance(reply, BaseException):  # not a peer's failure: a bug, say so
                result["answers"][uid] = None
                result["error"] = text(f"{type(reply).__name__}: {reply}")
                continue
            info, seconds = reply
            result["reachable"] = True
            result["answers"][uid] = info
            latencies.append(seconds)
        if result["reachable"]:
            result["error"] = ""
        result["latency_ms"] = round(1000 * min(latencies), 1) if latencies else None
        return result

    async def _probe(self, servers: dict[str, ServerSeen]) -> dict[str, dict[str, Any]]:
        quota = max(1, self.limits.max_probes // max(1, len(servers)))
        addresses = list(servers)
        results = await asyncio.gather(*(self._probe_server(servers[a], quota) for a in addresses))
        return dict(zip(addresses, results, strict=True))

    async def _trainer_row(
        self, announcement: TrainerAnnouncement, owner: bytes, now: float
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "run_id": announcement.run_id,
            "address": announcement.address,
            "fingerprint": fingerprint(owner),
            "public_key": owner[:64].hex(),
            "model": announcement.model,
            "dataset": announcement.dataset,
            "uid_prefix": announcement.uid_prefix,
            "grid": list(announcement.grid),
            "version": announcement.version,
            "announced": dict(announcement.extra),
            "reachable": False,
        }
        try:
            status, seconds = await self.peers.trainer_status(announcement.address)
        except CallFailed as exc:
            row["error"] = text(exc)
            return row
        samples = max(0, status.samples_seen)
        last = self._samples.get(announcement.address)
        rate = None
        if last is not None and now > last[0] and samples >= last[1]:
            rate = (samples - last[1]) / (now - last[0])
        self._samples[announcement.address] = (now, samples)
        row.update(
            reachable=True,
            verified=status.public_key == owner,
            state=text(status.state)[:32],
            step=max(0, status.step),
            samples_seen=samples,
            samples_per_s=round(rate, 2) if rate is not None else None,
            steps_per_second=finite(round(status.steps_per_second, 3)),
            loss=finite(status.last_loss),
            test_accuracy=finite(status.test_accuracy),
            failed_steps=max(0, status.failed_steps),
            latency_ms=round(seconds * 1000, 1),
            more=extra_fields(status),
        )
        return row

    # ---------------------------------------------------------------- one round
    async def round(self) -> dict[str, Any]:
        """Look at the swarm once; the snapshot ``/api/swarm`` serves."""
        started = time.time()
        self._round += 1
        errors: list[str] = []
        nodes_task = asyncio.ensure_future(self._dht_nodes())
        try:
            try:
                found = await self.dht.get([GRIDS_KEY, TRAINERS_KEY], latest=True)
            except DHT_ERRORS as exc:
                errors.append(f"DHT: {text(exc)}")
                found = {}
            announced = self._grid_announcements(found.get(GRIDS_KEY))
            grids = self._choose_grids(announced)
            await asyncio.gather(*(self._walk(g) for g in grids))
            servers = self._servers(grids, announced)
            trainers = self._trainer_announcements(found.get(TRAINERS_KEY))
            now = time.time()
            probes, trainer_rows = await asyncio.gather(
                self._probe(servers),
                asyncio.gather(*(self._trainer_row(a, o, now) for a, o, _e in trainers)),
            )
            dht_nodes = await nodes_task
        finally:
            nodes_task.cancel()
            await self.peers.end_round()
        live_trainers = {a.address for a, _o, _e in trainers}
        self._samples = {a: v for a, v in self._samples.items() if a in live_trainers}
        return self._snapshot(grids, servers, probes, trainer_rows, dht_nodes, errors, started)

    # ---------------------------------------------------------------- the snapshot
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
        keys: dict[str, bytes] = {}
        for address, probe in probes.items():
            infos = [i for i in probe["answers"].values() if i is not None]
            keys[address] = infos[0].public_key[:64] if infos else b""
        steps: dict[tuple[str, str], tuple[float, int]] = {}
        experts, grid_rows = [], []
        for grid in grids:
            cells = layout(grid, self.limits.max_cells)
            alive_count = 0
            for uid in cells["uids"]:
                live: list[str] = []
                unreachable: list[str] = []
                uid_steps: int | None = None
                rate: float | None = None
                for replica in grid.uids.get(uid, []):
                    polled = probes.get(replica.address)
                    key = keys.get(replica.address, b"")
                    answer: Any = polled["answers"].get(uid, NOT_PROBED) if polled else None
                    ok = (
                        polled is not None
                        and polled["reachable"]
                        and answer is not None  # None: not hosted, or the call failed
                        and (not key or key == replica.owner)
                    )
                    if not ok:
                        if replica.address not in unreachable:
                            unreachable.append(replica.address)
                        continue
                    if replica.address not in live:
                        live.append(replica.address)
                    if answer is not NOT_PROBED:  # Info answered for this uid this round
                        count = max(0, answer.optimizer_steps)
                        uid_steps = (uid_steps or 0) + count
                        last = self._steps.get((replica.address, uid))
                        steps[(replica.address, uid)] = (now, count)
                        if last is not None and now > last[0] and count >= last[1]:
                            rate = (rate or 0.0) + (count - last[1]) / (now - last[0])
                    elif (replica.address, uid) in self._steps:
                        steps[(replica.address, uid)] = self._steps[(replica.address, uid)]
                alive_count += bool(live)
                experts.append({
                    "uid": uid,
                    "grid": grid.prefix,
                    "alive": bool(live),
                    "servers": live,
                    "unreachable": unreachable,
                    "steps": uid_steps,
                    "steps_per_s": round(rate, 3) if rate is not None else None,
                })  # fmt: skip
            grid_rows.append({
                "prefix": grid.prefix,
                "shape": cells["shape"],
                "declared_shape": list(grid.declared_shape) if grid.declared_shape else None,
                "complete": cells["complete"],
                "truncated": grid.truncated,
                "cells": len(cells["uids"]),
                "alive": alive_count,
                "dead": len(cells["uids"]) - alive_count,
                "rows": cells["rows"],
            })  # fmt: skip
        self._steps = steps
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
