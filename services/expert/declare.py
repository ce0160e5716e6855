"""Declaring hosted experts in the DHT (key scheme: docs/contracts.md, built by
:func:`services.common.expert_keys.declaration_items`).

For uid ``ffn.3.14`` at ``host:port``: key ``ffn.3.14`` subkey ``""`` -> address; key ``ffn.3.``
subkey ``14`` -> address; key ``ffn.`` subkey ``3`` -> address; every entry *owned* by this
server (signed with its identity, in its own slot: nobody else can overwrite or remove it, and
other servers hosting the same uid declare side by side); all in one ``put`` per period with
expiration ``DHT time + 2 * period``. A missed round (DHT down) therefore does not make the
experts vanish, and after shutdown they vanish within two periods because nobody renews them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from services.common.expert_keys import Item, declaration_items
from services.common.renewal import Renewal, RenewalFailed
from services.expert.metrics import ExpertMetrics

log = logging.getLogger(__name__)


class Declarer:
    """Re-declares the experts every ``period`` seconds until stopped.

    The timing is :class:`services.common.renewal.Renewal`'s: after a failed round it retries
    sooner (about 1 s, doubling up to ``period``), so the experts reappear quickly when the DHT
    comes back from an outage; a streak of failures is logged once, every failure is counted
    in ``dmoe_expert_dht_declaration_failures_total{reason}``.
    """

    def __init__(
        self,
        client: Any,
        uids: list[str],
        address: str,
        period: float,
        metrics: ExpertMetrics,
        extra: Callable[[float], list[Item]] | None = None,
    ) -> None:
        self.client = client
        self.extra = extra  # more entries renewed with the experts (the grid announcement)
        self.uids = uids
        self.address = address
        self.period = period
        self.metrics = metrics
        self.first_success = asyncio.Event()
        self.renewal = Renewal(self._round, period, name="DHT declaration", logger=log)
        self._last_expiration = 0.0
        self._one_at_a_time = asyncio.Lock()

    async def declare_once(self) -> bool:
        """One round; False when the DHT failed or refused part of it (counted and logged).

        Rounds never overlap and never carry an earlier expiration than the round before:
        the DHT refuses a renewal older than what it holds (a round that overtook another,
        or a DHT clock correction that moved ``now`` back, would look like one)."""
        try:
            await self._round()
        except RenewalFailed as exc:
            log.warning(str(exc), extra=exc.fields)
            return False
        return True

    async def _round(self) -> None:
        """One round; raises :class:`RenewalFailed` (already counted) when it failed."""
        async with self._one_at_a_time:
            expiration = max(self.client.now() + 2 * self.period, self._last_expiration)
            self._last_expiration = expiration
            items = declaration_items(self.uids, self.address, expiration)
            if self.extra is not None:
                try:
                    items += self.extra(expiration)
                except Exception as exc:  # never let the announcement stop the declarations
                    log.warning("grid announcement failed", extra={"error": repr(exc)})
            await self._put(items)

    async def _put(self, items: list[Item]) -> None:
        try:
            stored = await self.client.put(items, owned=True)
        except Exception as exc:
            reason = "unavailable" if isinstance(exc, ConnectionError) else type(exc).__name__
            self.metrics.declaration_failures.labels(reason).inc()
            raise RenewalFailed("DHT declaration failed", reason=reason, error=str(exc)) from exc
        if not all(stored):
            self.metrics.declaration_failures.labels("not_stored").inc()
            raise RenewalFailed(
                "DHT stored only part of the declaration", stored=sum(stored), items=len(items)
            )
        self.metrics.declarations.inc()
        self.first_success.set()
        log.debug("declared experts", extra={"experts": len(self.uids), "items": len(items)})

    def start(self) -> None:
        self.renewal.start()

    async def stop(self) -> None:
        """Stop renewing (a round in flight may finish); the entries expire by themselves
        within ``2 * period``."""
        await self.renewal.stop()
