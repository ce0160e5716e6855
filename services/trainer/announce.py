"""The trainer's announcement in the DHT: an owned entry under ``_dmoe.trainers`` (subkey: the
run id) saying where its read-only ``Trainer/Status`` answers and what it trains
(:mod:`services.common.announcements`), so the swarm's explorer finds trainers without flags.

Renewed every ``period`` seconds with expiration ``DHT time + 3 * period``: a stopped trainer
disappears within three periods; a missed round (DHT down) does not hide a live one, and a
failed round is retried sooner (about 1 s, doubling up to the period:
:class:`services.common.renewal.Renewal`, the expert declarations' timing). The entry is
signed with the trainer's identity, so nobody else can overwrite or remove it.
"""

from __future__ import annotations

import logging
from typing import Any

from services.common.announcements import TRAINERS_KEY, TrainerAnnouncement
from services.common.renewal import Renewal, RenewalFailed

log = logging.getLogger(__name__)


class TrainerAnnouncer:
    """Puts ``announcement`` into the DHT every ``period`` seconds until stopped."""

    def __init__(self, client: Any, announcement: TrainerAnnouncement, period: float) -> None:
        self.client = client
        self.value = announcement.encode()
        self.run_id = announcement.run_id
        self.period = period
        self.renewal = Renewal(self._announce, period, name="trainer announcement", logger=log)
        self._last_expiration = 0.0

    async def announce_once(self) -> bool:
        """One round; False when the DHT failed or refused it (logged)."""
        try:
            await self._announce()
        except RenewalFailed as exc:
            log.warning(str(exc), extra=exc.fields)
            return False
        return True

    async def _announce(self) -> None:
        expiration = max(self.client.now() + 3 * self.period, self._last_expiration)
        self._last_expiration = expiration
        try:
            (stored,) = await self.client.put(
                [(TRAINERS_KEY, self.run_id, self.value, expiration)], owned=True
            )
        except Exception as exc:  # the DHT down or refusing: retried soon
            raise RenewalFailed("trainer announcement failed", error=repr(exc)) from exc
        if not stored:
            raise RenewalFailed("trainer announcement not stored")

    async def start(self) -> None:
        self.renewal.start()

    async def stop(self) -> None:
        """Stop renewing (a round in flight may finish); the entry expires within 3 periods."""
        await self.renewal.stop()
