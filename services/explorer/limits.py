"""How much one explorer round may look at (:mod:`services.explorer.collect`).

Everything a round reads from the DHT or asks of peers is bounded, so a swarm that announces
more (or a hostile one announcing junk) costs the explorer a bounded amount of work per round;
what is past a bound is left out and counted (``over_limit``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one round may look at; everything past these is left out (and said so)."""

    max_grids: int = 16
    max_cells: int = 4096  # uids per grid: a declared shape larger is drawn sparse
    max_servers: int = 512
    max_trainers: int = 256
    max_dht_nodes: int = 64
    max_probes: int = 1024  # Expert/Info calls per round, all servers together
