"""Whether the peers the DHT names answer: DHT nodes, expert servers, trainers.

:class:`Prober` does the peer half of an explorer round (:mod:`services.explorer.collect`):
``DHT/NodeStatus`` of the initial DHT nodes and, breadth first, of the peers they name;
``Expert/Info`` of the uids each declaring server holds (at most ``max_probes`` per round, all
servers together, rotating through a server's uids round by round), which proves the server
answers with the key that signed its declarations; ``Trainer/Status`` of every announced
trainer, with its sample rate since the previous round. Every call has a deadline
(:class:`~services.explorer.peers.Peers`); a peer that fails is a row saying so.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from services.common.addresses import is_peer_address
from services.common.announcements import GridAnnouncement, TrainerAnnouncement
from services.common.rejections import Rejections
from services.explorer.limits import Limits
from services.explorer.peers import CallFailed, Peers
from services.explorer.rows import Grid, ServerSeen, extra_fields, fingerprint, finite, text


class Prober:
    """Asks the swarm's peers about themselves; keeps each trainer's last sample count (for its
    rate; :meth:`keep_trainers` drops those no longer announced)."""

    def __init__(
        self, peers: Peers, initial_peers: list[str], limits: Limits, rejections: Rejections
    ) -> None:
        self.peers = peers
        self.initial_peers = list(initial_peers)
        self.limits = limits
        self.rejections = rejections
        self._samples: dict[str, tuple[float, int]] = {}  # trainer address -> t, samples seen

    def _reject(self, reason: str, message: str, source: str = "", **fields: object) -> None:
        self.rejections.reject(reason, message, source, **fields)

    def keep_trainers(self, addresses: set[str]) -> None:
        self._samples = {a: v for a, v in self._samples.items() if a in addresses}

    # ---------------------------------------------------------------- DHT nodes
    async def dht_nodes(self) -> list[dict[str, Any]]:
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

    def servers(
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

    async def _probe_server(self, seen: ServerSeen, quota: int, round_: int) -> dict[str, Any]:
        """Info of up to ``quota`` of the server's uids (rotating by round)."""
        uids = list(seen.uids)
        if uids and len(uids) > quota:
            start = (round_ * quota) % len(uids)
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

    async def probe(self, servers: dict[str, ServerSeen], round_: int) -> dict[str, dict[str, Any]]:
        quota = max(1, self.limits.max_probes // max(1, len(servers)))
        addresses = list(servers)
        results = await asyncio.gather(
            *(self._probe_server(servers[a], quota, round_) for a in addresses)
        )
        return dict(zip(addresses, results, strict=True))

    async def trainer_row(
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
