"""The trainer's announcement in the DHT: an owned entry under ``_dmoe.trainers`` (subkey: the
run id) saying where its read-only ``Trainer/Status`` answers and what it trains
(:mod:`services.common.announcements`), so the swarm's explorer finds trainers without flags.

Renewed every ``period`` seconds with expiration ``DHT time + 3 * period``: a stopped trainer
disappears within three periods; a missed round (DHT down) does not hide a live one. The entry
is signed with the trainer's identity, so nobody else can overwrite or remove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from services.common.announcements import TRAINERS_KEY, TrainerAnnouncement

log = logging.getLogger(__name__)


class TrainerAnnouncer:
    """Puts ``announcement`` into the DHT every ``period`` seconds until stopped."""

    def __init__(self, client: Any, announcement: TrainerAnnouncement, period: float) -> None:
        self.client = client
        self.value = announcement.encode()
        self.run_id = announcement.run_id
        self.period = period
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_expiration = 0.0

    async def announce_once(self) -> bool:
        expiration = max(self.client.now() + 3 * self.period, self._last_expiration)
        self._last_expiration = expiration
        try:
            (stored,) = await self.client.put(
                [(TRAINERS_KEY, self.run_id, self.value, expiration)], owned=True
            )
        except Exception as exc:  # the DHT down or refusing: try again next round
            log.warning("trainer announcement failed", extra={"error": repr(exc)})
            return False
        return bool(stored)

    async def _loop(self) -> None:
        while not self._stop.is_set():
            await self.announce_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.period)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="announce")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
