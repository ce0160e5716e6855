"""What a round found, and how it becomes the rows of ``/api/swarm``.

The dataclasses hold what the DHT said (``Grid``: uids and the replicas declaring them;
``ServerSeen``: an address, the keys that declared it, its announcement); the functions turn
them, with the answers of the peers, into plain JSON-ready rows: the cells of a grid's map
(:func:`layout`, never more than ``max_cells``), a server's row, a trainer's extra fields.
Every string from a peer is cut to a bounded length here; escaping is the renderer's job.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from services.common.announcements import GridAnnouncement
from services.common.expert_keys import make_uid, prefix_key, split_uid

MAX_TEXT = 200  # characters kept of any error or free text field from a peer
STATUS_FIELDS = {  # Trainer/Status fields with their own column; others go to "more"
    "step", "samples_seen", "last_loss", "test_loss", "test_accuracy", "last_eval_step",
    "experts_in_use", "model", "dataset", "state", "steps_per_second", "failed_steps",
    "uptime_seconds", "public_key", "experts_called",
}  # fmt: skip


def fingerprint(public_key: bytes) -> str:
    """A short name for a public key: its first 16 hex digits, the start of what every
    service logs at start as ``public_key``, so a volunteer finds their own server."""
    return public_key[:8].hex()


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def text(value: Any) -> str:
    return str(value)[:MAX_TEXT]


@dataclass
class Replica:
    address: str
    owner: bytes
    expiration: float


@dataclass
class Grid:
    prefix: str
    declared_shape: tuple[int, ...] | None
    uids: dict[str, list[Replica]] = field(default_factory=dict)
    truncated: bool = False


@dataclass
class ServerSeen:
    address: str
    owners: set[bytes] = field(default_factory=set)
    uids: dict[str, None] = field(default_factory=dict)  # ordered, no duplicates
    announcement: GridAnnouncement | None = None
    announced_by: bytes = b""


def layout(grid: Grid, max_cells: int) -> dict[str, Any]:
    """The cells to draw: the whole declared (or observed) grid when it has at most
    ``max_cells`` cells, dead ones included; else only the uids seen. Rows are grouped by
    all coordinates but the last."""
    coords_of = {u: split_uid(u)[1] for u in grid.uids}
    seen = sorted(grid.uids, key=coords_of.__getitem__)
    dims = {len(coords_of[u]) for u in seen}
    shape = list(grid.declared_shape) if grid.declared_shape else None
    if shape is None and len(dims) == 1:
        (ndim,) = dims
        shape = [1 + max(coords_of[u][d] for u in seen) for d in range(ndim)]
    if shape is not None and all(len(coords_of[u]) == len(shape) for u in seen):
        for uid in seen:  # widen to cover what is declared outside the announced shape
            shape = [max(s, c + 1) for s, c in zip(shape, coords_of[uid], strict=True)]
    complete = shape is not None and math.prod(shape) <= max_cells
    if complete and shape is not None and all(len(coords_of[u]) == len(shape) for u in seen):
        uids = [
            make_uid(grid.prefix, coords)
            for coords in itertools.product(*(range(n) for n in shape))
        ]
    else:
        complete, uids = False, seen
    rows: list[dict[str, Any]] = []
    for uid in uids:
        name, coords = split_uid(uid)
        label = prefix_key(name, coords[:-1])  # the key that lists this row's cells
        if not rows or rows[-1]["label"] != label:
            rows.append({"label": label, "cells": []})
        rows[-1]["cells"].append(uid)
    return {"uids": uids, "rows": rows, "shape": shape, "complete": complete}


def server_row(seen: ServerSeen, probe: dict[str, Any], key: bytes) -> dict[str, Any]:
    announcement = seen.announcement
    infos = [i for i in probe.get("answers", {}).values() if i is not None]
    owner = key or (next(iter(seen.owners)) if len(seen.owners) == 1 else seen.announced_by)
    row: dict[str, Any] = {
        "address": seen.address,
        "reachable": bool(probe.get("reachable")),
        "error": probe.get("error", ""),
        "latency_ms": probe.get("latency_ms"),
        "public_key": owner.hex(),
        "fingerprint": fingerprint(owner),
        "experts": sorted(seen.uids)[:256],
        "num_experts": len(seen.uids),
        # declarations of this address signed by another key than the one it answers with
        "foreign_declarations": sum(1 for o in seen.owners if key and o != key),
        "steps": sum(max(0, i.optimizer_steps) for i in infos) if infos else None,
        "max_batch_size": max((i.max_batch_size for i in infos), default=None),
        "expert_class": text(infos[0].expert_class)[:64] if infos else "",
        "announced": announcement is not None and (not key or seen.announced_by == key),
    }
    if announcement is not None and row["announced"]:
        row.update(
            grid=announcement.prefix,
            version=announcement.version,
            tls=announcement.tls,
            max_batch_size=announcement.max_batch_size or row["max_batch_size"],
            max_queue_samples=announcement.max_queue_samples,
            queued=announcement.queued,
            samples_per_s=announcement.samples_per_s,
        )
        if not row["expert_class"]:
            row["expert_class"] = announcement.expert_cls
    return row


def extra_fields(status: Any) -> dict[str, Any]:
    """Scalar fields of ``Trainer/Status`` that have no column of their own (fields added
    after this page was written, such as an averaging round): shown as they come."""
    more: dict[str, Any] = {}
    for descriptor in status.DESCRIPTOR.fields[:64]:
        name = descriptor.name
        if name in STATUS_FIELDS or descriptor.message_type is not None:
            continue
        value = getattr(status, name)
        if isinstance(value, bytes):
            value = value[:32].hex()
        elif not isinstance(value, str | int | float | bool):
            value = list(value)[:8]  # a repeated scalar
            value = [text(v)[:64] for v in value]
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        elif isinstance(value, str):
            value = text(value)
        more[name] = value
    return more
