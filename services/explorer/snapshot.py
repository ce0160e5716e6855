"""The expert and grid rows of an explorer snapshot: the DHT's declarations against the probes.

A replica of an expert is *alive* when its server answered this round
(:mod:`services.explorer.probing`), with the public key that owns the declaration, and did not
deny hosting the uid. An expert's step rate is its optimizer steps since the previous round's
count for that replica; counts of replicas not asked this round carry over, so the rotation of
probes does not reset them.
"""

from __future__ import annotations

from typing import Any

from services.explorer.rows import Grid, layout

NOT_PROBED: Any = object()  # a uid whose server was not asked about it this round
Steps = dict[tuple[str, str], tuple[float, int]]  # (address, uid) -> (time, optimizer steps)


def server_keys(probes: dict[str, dict[str, Any]]) -> dict[str, bytes]:
    """The public key each server answered Info with this round (empty: it did not)."""
    keys: dict[str, bytes] = {}
    for address, probe in probes.items():
        infos = [i for i in probe["answers"].values() if i is not None]
        keys[address] = infos[0].public_key[:64] if infos else b""
    return keys


def expert_rows(
    grids: list[Grid],
    probes: dict[str, dict[str, Any]],
    keys: dict[str, bytes],
    previous: Steps,
    max_cells: int,
    now: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Steps]:
    """(a row per expert, a row per grid, the step counts to keep for the next round)."""
    steps: dict[tuple[str, str], tuple[float, int]] = {}
    experts, grid_rows = [], []
    for grid in grids:
        cells = layout(grid, max_cells)
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
                    last = previous.get((replica.address, uid))
                    steps[(replica.address, uid)] = (now, count)
                    if last is not None and now > last[0] and count >= last[1]:
                        rate = (rate or 0.0) + (count - last[1]) / (now - last[0])
                elif (replica.address, uid) in previous:
                    steps[(replica.address, uid)] = previous[(replica.address, uid)]
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
    return experts, grid_rows, steps
