"""One scheduler per device: runs ready pools, oldest waiting request first.

The scheduler is a coroutine on the event loop (pools are only touched there, so they need no
locks) that hands each batch to a small thread pool; compute never blocks the loop, which keeps
receiving, decoding and answering other requests while a batch runs.

On CPU it runs ``workers`` batches at once, each with ``torch_threads`` intra-op threads, and
never two batches of one expert at a time. Measured on the 2-core CI machine, two
single-threaded batches of different experts side by side do ~1.4x the work of one batch on
two intra-op threads (OpenMP barriers waste time on small batches and collapse when the cores
are shared with the RPC work). With a single expert only one worker can be busy, so the
default then gives that worker all cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch

from services.expert.backend import BadRequest
from services.expert.metrics import ExpertMetrics
from services.expert.task_pool import PoolClosed, Task, TaskPool

log = logging.getLogger(__name__)


def default_parallelism(device: str, num_experts: int) -> tuple[int, int]:
    """(workers, torch threads per worker) for a device hosting ``num_experts`` experts."""
    if device != "cpu":
        return 1, max(1, (os.cpu_count() or 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    workers = max(1, min(cores, num_experts))
    return workers, max(1, cores // workers)


class BatchError(Exception):
    """A request failed in its batch: the gRPC status it gets, and the reason it is counted
    under in ``dmoe_expert_rejected_total`` (None: not a refusal of its input)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class DeviceScheduler:
    def __init__(
        self,
        device: str,
        metrics: ExpertMetrics,
        *,
        workers: int = 1,
        torch_threads: int = 1,
    ) -> None:
        self.device = device
        self.metrics = metrics
        self.workers = workers
        self.torch_threads = torch_threads
        self.pools: list[TaskPool] = []
        self._busy: set[str] = set()
        self._free = workers
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self._closing = False
        self._running: set[asyncio.Future[Any]] = set()
        self._executor = ThreadPoolExecutor(
            workers, thread_name_prefix=f"compute-{device}", initializer=self._init_thread
        )

    def _init_thread(self) -> None:
        torch.set_num_threads(self.torch_threads)

    def add_pool(self, pool: TaskPool) -> None:
        pool.scheduler = self
        self.pools.append(pool)

    def notify(self) -> None:
        """A request arrived: schedule once per loop iteration, so requests that arrive
        together are queued before the next batch is cut."""
        if not self._scheduled and not self._closing:
            self._scheduled = True
            self._loop.call_soon(self._schedule)

    def start(self) -> None:
        torch.set_num_threads(self.torch_threads)
        self._loop = asyncio.get_running_loop()

    def _pick(self, now: float) -> tuple[TaskPool | None, float | None]:
        """The ready pool with the oldest request, or when the next one becomes ready."""
        best: TaskPool | None = None
        best_arrival = float("inf")
        next_ready: float | None = None
        for pool in self.pools:
            arrival = pool.oldest()
            if arrival is None or pool.backend.uid in self._busy:
                continue
            ready = pool.ready_at()
            if ready <= now:
                if arrival < best_arrival:
                    best, best_arrival = pool, arrival
            elif next_ready is None or ready < next_ready:
                next_ready = ready
        return best, next_ready

    def _schedule(self) -> None:
        """Dispatch ready pools to free workers; arm a timer for the next pool to get ready.

        Runs as a plain callback (on arrival, on batch completion, on the timer): no task,
        no polling, nothing to do while idle.
        """
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        next_ready = None
        while self._free and not self._closing:
            pool, next_ready = self._pick(time.monotonic())
            if pool is None:
                break
            self._dispatch(self._loop, pool)
        if next_ready is not None and self._free and not self._closing:
            delay = max(0.0, next_ready - time.monotonic())
            self._timer = self._loop.call_later(delay, self._schedule)

    def _dispatch(self, loop: asyncio.AbstractEventLoop, pool: TaskPool) -> None:
        batch = pool.take()
        started = time.monotonic()
        for task in batch:
            pool.m_wait.observe(started - task.arrived)
        self._busy.add(pool.backend.uid)
        self._free -= 1
        future = loop.run_in_executor(self._executor, self._compute, pool, batch)
        self._running.add(future)
        future.add_done_callback(lambda f: self._finished(pool, batch, f))

    @staticmethod
    def _compute(pool: TaskPool, batch: list[Task]) -> tuple[list[Any], float, int]:
        started = time.perf_counter()
        try:
            replies = pool.run(batch)
        except BadRequest as exc:
            raise BatchError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.reason) from exc
        except Exception as exc:
            log.exception("batch failed", extra={"expert": pool.backend.uid})
            raise BatchError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}") from exc
        return replies, time.perf_counter() - started, pool.backend.steps

    def _finished(self, pool: TaskPool, batch: list[Task], future: asyncio.Future[Any]) -> None:
        self._running.discard(future)
        self._busy.discard(pool.backend.uid)
        self._free += 1
        if not self._closing:
            self._schedule()
        exc = future.exception() if not future.cancelled() else PoolClosed("cancelled")
        if exc is not None:
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(exc)
            return
        replies, seconds, _ = future.result()
        ok = [not isinstance(r, BadRequest) for r in replies]
        for task, reply, fine in zip(batch, replies, ok, strict=True):
            if not fine and not task.future.done():
                task.future.set_exception(
                    BatchError(grpc.StatusCode.INVALID_ARGUMENT, str(reply), reply.reason)
                )
        batch = [task for task, fine in zip(batch, ok, strict=True) if fine]
        replies = [reply for reply, fine in zip(replies, ok, strict=True) if fine]
        if not batch:
            return
        rows = sum(task.rows for task in batch)
        pool.m_compute.observe(seconds)
        pool.m_rows.observe(rows)
        pool.m_requests.observe(len(batch))
        pool.m_samples.inc(rows)
        for task, reply in zip(batch, replies, strict=True):
            if not task.future.done():
                task.future.set_result(reply)

    async def close(self) -> None:
        """Refuse queued requests (UNAVAILABLE), wait for running batches, stop the threads."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        for pool in self.pools:
            for task in pool.close():
                if not task.future.done():
                    task.future.set_exception(PoolClosed("the server is shutting down"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)
