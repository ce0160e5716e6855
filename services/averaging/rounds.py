"""What a round is made of: the averaging settings, a round's result, and this peer's view of one.

Shared by the member's side (:mod:`services.averaging.averager`, which runs rounds) and the
reducer's (:mod:`services.averaging.reduce_handler`, which answers ``Reduce`` against the view
of the round this peer formed).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from services.averaging.aggregate import Aggregation
from services.averaging.matchmaking import Member
from services.averaging.reduction import Reduction


@dataclass
class AveragerConfig:
    """How a peer averages; every member of a run should use the same values."""

    run_id: str
    target_group_size: int = 8
    window: float = 2.0  # seconds per matchmaking slot (DHT clock)
    settle: float = 0.3  # read the slot this long after it closes
    lead: float = 0.3  # join a slot only this long before it closes (else the next one)
    reduce_timeout: float = 10.0  # reducers wait this long after the read for slices
    reply_grace: float = 5.0  # members wait this much longer for the reduced parts
    compression: str = "none"  # none | float16 on the wire
    aggregation: Aggregation = field(default_factory=Aggregation)
    chunk_bytes: int = 1 << 20
    state_offer_period: float = 10.0  # re-announce the state offer this often (0: never)
    # refuse a reduced part that moves this peer's values (RMS) more than this times the median
    # of the other parts' moves (groups of 3 or more; 0: off)
    result_factor: float = 10.0


@dataclass
class PartResult:
    start: int
    end: int
    contributors: list[bytes]  # public keys of the members whose slices the part holds
    radius: float


@dataclass
class RoundResult:
    """What one round gave: ``vector`` is None unless ``outcome`` is ``ok``."""

    outcome: str  # ok | alone | failed
    slot: int
    group: list[bytes] = field(default_factory=list)
    vector: np.ndarray | None = None
    parts: list[PartResult] = field(default_factory=list)
    seconds: float = 0.0
    reason: str = ""
    finished_at: float = 0.0

    @property
    def group_size(self) -> int:
        return len(self.group)


class RoundView:
    """This peer's view of one slot; reducers' handlers wait on ``formed``."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.formed = asyncio.Event()
        self.digest = b""
        self.members: list[Member] = []
        self.index = -1
        self.position: dict[bytes, int] = {}
        self.bounds: list[tuple[int, int]] = []
        self.reduction: Reduction | None = None
        self.replies_by = 0.0  # DHT time after which a member stops waiting for reduced parts
