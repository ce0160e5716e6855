"""The renewal loop (services/common/renewal.py) the expert declarations and the trainer's
announcement share: retries sooner than the period with a capped, jittered back-off, one
log line per failure streak, and a prompt stop that awaits (or past its grace cancels) the
attempt in flight. Real asyncio; the tests wait on events, and periods are an hour long so
that a loop waiting a period where it should not hangs (bounded) instead of passing."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest
from helpers import ROOT, free_port, run_async, until

from services.common.announcements import TRAINERS_KEY, TrainerAnnouncement
from services.common.identity import Identity
from services.common.renewal import Renewal, RenewalFailed
from services.dht.client import DHTClient
from services.dht.server import start_node
from services.trainer.announce import TrainerAnnouncer

HOUR = 3600.0
HANG = 60.0  # bounds a hang only


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno == level]


def logger(name: str) -> tuple[logging.Logger, Records]:
    log = logging.getLogger(f"test_renewal.{name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    records = Records()
    log.handlers[:] = [records]
    return log, records


def test_retry_delays_double_from_the_first_retry_up_to_the_cap_minus_jitter() -> None:
    low = Renewal(lambda: asyncio.sleep(0), 10.0, name="x", rand=lambda: 0.0)
    assert [low.retry_delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert low.retry_delay(10**9) == 10.0  # no float overflow after a very long outage
    high = Renewal(lambda: asyncio.sleep(0), 10.0, name="x", jitter=0.25, rand=lambda: 0.999)
    assert 0.75 < high.retry_delay(1) < 0.76 and 7.5 < high.retry_delay(5) < 7.6
    capped = Renewal(lambda: asyncio.sleep(0), 10.0, name="x", max_retry=3.0, rand=lambda: 0)
    assert capped.retry_delay(3) == 3.0
    with pytest.raises(ValueError):
        Renewal(lambda: asyncio.sleep(0), 0.0, name="x")
    with pytest.raises(ValueError):
        Renewal(lambda: asyncio.sleep(0), 1.0, name="x", jitter=1.0)


@run_async
async def test_failures_retry_sooner_than_the_period_back_off_and_log_once_per_streak() -> None:
    log, records = logger("streak")
    waits: list[float] = []
    done = asyncio.Event()
    calls = 0

    async def renew() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            waits.append(renewal.delay)  # the wait that came before this attempt
        if calls <= 3:
            raise ConnectionError(f"down {calls}")
        done.set()

    renewal = Renewal(renew, HOUR, name="thing", logger=log, first_retry=0.01, rand=lambda: 0.5)
    renewal.start()
    await asyncio.wait_for(done.wait(), HANG)
    # 3 failures: retries after 0.01, 0.02, 0.04 s (each shortened by half the 20% jitter)
    assert waits == pytest.approx([0.009, 0.018, 0.036])
    assert renewal.failures == 0 and renewal.delay == HOUR
    assert renewal.succeeded.is_set() and renewal.last_success is not None
    (warning,) = records.at(logging.WARNING)  # one line for the streak...
    assert warning.getMessage() == "thing failed" and "down 1" in warning.error  # type: ignore[attr-defined]
    assert [r.failures for r in records.at(logging.DEBUG)] == [2, 3]  # type: ignore[attr-defined]
    (recovered,) = records.at(logging.INFO)  # ...and one for its end
    assert recovered.failures_before == 3  # type: ignore[attr-defined]
    await asyncio.wait_for(renewal.stop(), HANG)  # the hour's wait ends at once
    assert calls == 4


@run_async
async def test_a_renewal_failed_is_logged_with_its_own_message_and_fields() -> None:
    log, records = logger("fields")
    failed = asyncio.Event()

    async def renew() -> None:
        failed.set()
        raise RenewalFailed("DHT stored only part", stored=2, items=3)

    renewal = Renewal(renew, HOUR, name="thing", logger=log, first_retry=HOUR)
    renewal.start()
    await asyncio.wait_for(failed.wait(), HANG)
    await asyncio.wait_for(renewal.stop(), HANG)
    (warning,) = records.at(logging.WARNING)
    assert warning.getMessage() == "DHT stored only part"
    assert (warning.stored, warning.items, warning.failures) == (2, 3, 1)  # type: ignore[attr-defined]
    assert renewal.failures == 1 and not renewal.succeeded.is_set()


@run_async
async def test_stop_during_an_attempt_awaits_it_and_starts_no_other() -> None:
    entered, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
    calls = 0

    async def renew() -> None:
        nonlocal calls
        calls += 1
        entered.set()
        await release.wait()
        finished.set()

    renewal = Renewal(renew, HOUR, name="thing")
    renewal.start()
    await asyncio.wait_for(entered.wait(), HANG)
    stopping = asyncio.create_task(renewal.stop(grace=HOUR))
    await asyncio.wait({stopping}, timeout=0.2)
    assert not stopping.done()  # it waits for the attempt, however long that takes
    release.set()
    await asyncio.wait_for(stopping, HANG)
    assert finished.is_set() and renewal.succeeded.is_set() and calls == 1


@pytest.mark.parametrize("cancel_stop", [False, True], ids=["past_grace", "stop_cancelled"])
@run_async
async def test_stop_cancels_an_attempt_past_its_grace_or_when_stop_is_cancelled(
    cancel_stop: bool,
) -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def renew() -> None:
        entered.set()
        try:
            await asyncio.Event().wait()  # a call that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    renewal = Renewal(renew, HOUR, name="thing", logger=logger("grace")[0])
    renewal.start()
    await asyncio.wait_for(entered.wait(), HANG)
    if cancel_stop:
        stopping = asyncio.create_task(renewal.stop(grace=HOUR))
        await asyncio.sleep(0)  # one turn of the loop: stop() begins waiting on the attempt
        stopping.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
    else:
        await asyncio.wait_for(renewal.stop(grace=0.05), HANG)
    await asyncio.wait_for(cancelled.wait(), HANG)
    assert not renewal.succeeded.is_set() and renewal.failures == 0


@run_async
async def test_a_cancellation_raised_inside_an_attempt_is_a_failure_not_a_stop() -> None:
    succeeded = asyncio.Event()
    calls = 0

    async def renew() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError  # e.g. a library cancelling its own call
        succeeded.set()

    renewal = Renewal(renew, HOUR, name="thing", logger=logger("inner")[0], first_retry=0.01)
    renewal.start()
    await asyncio.wait_for(succeeded.wait(), HANG)
    await asyncio.wait_for(renewal.stop(), HANG)
    assert calls == 2


@run_async
async def test_the_trainer_announcement_retries_long_before_its_period() -> None:
    """A trainer started before its DHT is announced soon after the DHT comes up, not a
    period later (the back-off announce.py gained from the shared renewal)."""
    port = free_port()
    key = Identity.generate()
    async with DHTClient([f"127.0.0.1:{port}"], identity=key, timeout=2.0) as client:
        announcer = TrainerAnnouncer(client, TrainerAnnouncement("run-1", "127.0.0.1:5"), HOUR)
        await announcer.start()
        await until(lambda: announcer.renewal.failures >= 1, HANG, "a failed announcement")
        assert not announcer.renewal.succeeded.is_set()
        node = await start_node(port=port)
        try:
            await asyncio.wait_for(announcer.renewal.succeeded.wait(), HANG)
            found = await client.get([TRAINERS_KEY], latest=True)
            entries = found[TRAINERS_KEY]
            assert isinstance(entries, dict)
            (entry,) = entries[b"run-1"]
            assert entry.owner == key.public_key
            await asyncio.wait_for(announcer.stop(), HANG)
        finally:
            await node.stop(0)


def test_the_renewal_module_imports_no_torch() -> None:
    code = "import sys, services.common.renewal; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
