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
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from services.common.expert_keys import Item, declaration_items
from services.expert.metrics import ExpertMetrics

log = logging.getLogger(__name__)


class Declarer:
    """Re-declares the experts every ``period`` seconds until stopped.

    After a failed round it retries sooner (1 s, doubling up to ``period``), so the experts
    reappear quickly when the DHT comes back from an outage.
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
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_expiration = 0.0
        self._one_at_a_time = asyncio.Lock()

    async def declare_once(self) -> bool:
        """One round; False when the DHT failed or refused part of it.

        Rounds never overlap and never carry an earlier expiration than the round before:
        the DHT refuses a renewal older than what it holds (a round that overtook another,
        or a DHT clock correction that moved ``now`` back, would look like one)."""
        async with self._one_at_a_time:
            expiration = max(self.client.now() + 2 * self.period, self._last_expiration)
            self._last_expiration = expiration
            items = declaration_items(self.uids, self.address, expiration)
            if self.extra is not None:
                try:
                    items += self.extra(expiration)
                except Exception as exc:  # never let the announcement stop the declarations
                    log.warning("grid announcement failed", extra={"error": repr(exc)})
            return await self._put(items)

    async def _put(self, items: list[Item]) -> bool:
        try:
            stored = await self.client.put(items, owned=True)
        except Exception as exc:
            reason = "unavailable" if isinstance(exc, ConnectionError) else type(exc).__name__
            self.metrics.declaration_failures.labels(reason).inc()
            log.warning("DHT declaration failed", extra={"reason": reason, "error": str(exc)})
            return False
        if not all(stored):
            self.metrics.declaration_failures.labels("not_stored").inc()
            log.warning(
                "DHT stored only part of the declaration",
                extra={"stored": sum(stored), "items": len(items)},
            )
            return False
        self.metrics.declarations.inc()
        self.first_success.set()
        log.debug("declared experts", extra={"experts": len(self.uids), "items": len(items)})
        return True

    async def _loop(self) -> None:
        retry = 1.0
        while not self._stop.is_set():
            ok = await self.declare_once()
            delay = self.period if ok else min(retry, self.period)
            retry = 1.0 if ok else min(retry * 2, self.period)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="declare")

    async def stop(self) -> None:
        """Stop renewing; the entries expire by themselves within ``2 * period``."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
