"""Renewing something every period until stopped, retrying sooner after a failure.

The expert's DHT declarations (``services/expert/declare.py``) and the trainer's announcement
(``services/trainer/announce.py``) are owned DHT entries that expire unless renewed; each runs
one :class:`Renewal`, so both time, retry, log and stop the same way. Torch-free.

Timing: one attempt at :meth:`Renewal.start`, then one ``period`` s after each success
(counted from the end of the attempt, so attempts never overlap). After a failure the next
attempt comes ``first_retry`` s later, doubling with each further failure in a row up to
``max_retry`` (the period by default), each wait shortened at random by up to ``jitter`` (a
fraction), so servers that lost the DHT together do not all retry in the same instant.
Trade-off: retries sooner than the period cost a few more calls during an outage; in exchange
entries come back within seconds of its end instead of up to a period later, and the cap keeps
a long outage at no more than one call per period.

Logs: the first failure of a streak at WARNING (with the wait before the retry), the next
ones at DEBUG, and the first success after a streak at INFO with its length: a DHT down for an
hour writes two lines, not one per retry. Counting every failure is the caller's job (its own
metrics, labelled by reason).

Not ``services/trainer/backoff.py``: that one decides which experts a trainer skips (records
per uid and server, failure thresholds, a clock read at each call); this one only times one
loop, so sharing it would buy a one-line formula at the price of coupling the two.

Stopping: :meth:`Renewal.stop` ends a wait at once; an attempt in flight is awaited (up to
``grace`` s, then cancelled), so no renewal lands after ``stop()`` returns and a finished
attempt is not thrown away halfway. Cancelling the caller's loop (a task cancelled from
outside) cancels the attempt too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

_log = logging.getLogger(__name__)


class RenewalFailed(Exception):
    """A failure the renew function has already described: :class:`Renewal` logs the message
    and ``fields`` as they are (no traceback); any other exception is logged with its repr."""

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.fields = fields


class Renewal:
    """Runs ``renew()`` now and then every ``period`` s until :meth:`stop`; it fails by raising.

    Read-only state for callers and tests: ``failures`` (in a row, 0 after a success),
    ``last_success`` (``time.time()`` of the last success, None before), ``delay`` (the wait
    chosen after the last attempt), ``succeeded`` (set at the first success).
    """

    def __init__(
        self,
        renew: Callable[[], Awaitable[None]],
        period: float,
        *,
        name: str,
        logger: logging.Logger | None = None,
        first_retry: float = 1.0,
        max_retry: float | None = None,
        jitter: float = 0.2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not period > 0:
            raise ValueError(f"period must be > 0, got {period}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self._renew = renew
        self.period = period
        self.name = name
        self.log = logger or _log
        self.max_retry = period if max_retry is None else max(0.0, max_retry)
        self.first_retry = min(max(0.0, first_retry), self.max_retry)
        self.jitter = jitter
        self._rand = rand
        self.failures = 0
        self.last_success: float | None = None
        self.delay = 0.0
        self.succeeded = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def retry_delay(self, failures: int) -> float:
        """The wait after ``failures`` (>= 1) failures in a row, jitter included."""
        doubled = self.first_retry * 2.0 ** min(max(failures - 1, 0), 64)
        return min(self.max_retry, doubled) * (1.0 - self.jitter * self._rand())

    def start(self) -> None:
        """Start renewing on the running loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop renewing: a wait ends at once, an attempt in flight gets ``grace`` s to finish
        before it is cancelled. If ``stop()`` itself is cancelled, so is the attempt."""
        self._stopping.set()
        task = self._task
        if task is None:
            return
        try:
            _, pending = await asyncio.wait({task}, timeout=grace)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if pending:
            self.log.warning(
                f"{self.name}: attempt still running at stop; cancelled", extra={"grace": grace}
            )
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._renew()
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # stop() past its grace, or the loop shutting down
                self._failed(exc)  # a cancellation from inside the attempt: a failure
            except Exception as exc:
                self._failed(exc)
            else:
                self._succeeded()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.delay)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.delay = self.retry_delay(self.failures)
        if isinstance(exc, RenewalFailed):
            message, fields = str(exc), dict(exc.fields)
        else:
            message, fields = f"{self.name} failed", {"error": repr(exc)[:300]}
        fields.update(failures=self.failures, retry_in=round(self.delay, 2))
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        self.log.log(level, message, extra=fields)

    def _succeeded(self) -> None:
        if self.failures:
            self.log.info(f"{self.name} succeeded again", extra={"failures_before": self.failures})
        self.failures = 0
        self.last_success = time.time()
        self.delay = self.period
        self.succeeded.set()
