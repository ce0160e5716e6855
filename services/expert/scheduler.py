"""One scheduler per device: runs ready pools' batches on compute threads, oldest request first.

The scheduler lives on the event loop (pools are only touched there, so they need no locks).
A pool tells it when it is ready (``TaskPool.on_ready``); the scheduler takes a batch from the
ready pool with the oldest waiting request whose expert is not computing, and hands it with the
pool's :class:`~services.expert.batch_runner.BatchRunner` to a small thread pool. Compute never
blocks the loop, which keeps receiving, decoding and answering other requests while a batch runs;
when a batch ends, its requests' futures get their replies or errors and the next batch is picked.

On CPU it runs ``workers`` batches at once, each with ``torch_threads`` intra-op threads, and
never two batches of one expert at a time: single-threaded batches of different experts side by
side do more work than one batch on several intra-op threads (OpenMP barriers waste time on
small batches and collapse when the cores are shared with the RPC work; figures in
docs/expert.md). With a single expert only one worker can be busy, so the default then gives
that worker all cores. On a GPU one worker feeds the device.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch

from services.expert.batch_runner import BatchRunner
from services.expert.errors import ExpertError, from_exception, unavailable
from services.expert.task_pool import Task, TaskPool

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's CPU set), not the host's."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_parallelism(device: str, num_experts: int) -> tuple[int, int]:
    """(workers, torch threads per worker) for a device hosting ``num_experts`` experts."""
    cores = usable_cores()
    if device != "cpu":
        return 1, cores  # one thread feeds the GPU; host-side work may use every core
    workers = max(1, min(cores, num_experts))
    return workers, max(1, cores // workers)


class DeviceScheduler:
    def __init__(self, device: str, *, workers: int = 1, torch_threads: int = 1) -> None:
        self.device = torch.device(device)
        self.workers = workers
        self.torch_threads = torch_threads
        self._runners: dict[TaskPool, BatchRunner] = {}
        self._ready: dict[TaskPool, None] = {}  # pools that said they are ready (ordered set)
        self._busy: set[str] = set()  # experts computing now
        self._free = workers
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self._closing = False
        self._running: set[asyncio.Future[Any]] = set()
        self._executor = ThreadPoolExecutor(
            workers, thread_name_prefix=f"compute-{device}", initializer=self._init_thread
        )

    def _init_thread(self) -> None:
        torch.set_num_threads(self.torch_threads)
        if self.device.type == "cuda":
            # torch's current device is per thread: without this, cuda:N's batches would
            # create their buffers, streams and cuBLAS handles on device 0
            torch.cuda.set_device(self.device)

    def add(self, pool: TaskPool, runner: BatchRunner) -> None:
        """Run ``pool``'s batches with ``runner`` (the pool's ``on_ready`` is :meth:`ready`)."""
        self._runners[pool] = runner

    def start(self) -> None:
        torch.set_num_threads(self.torch_threads)
        self._loop = asyncio.get_running_loop()

    def ready(self, pool: TaskPool) -> None:
        """``TaskPool.on_ready``: schedule once per loop iteration, so requests that arrive
        together are queued before the next batch is cut."""
        self._ready[pool] = None
        if not self._scheduled and not self._closing:
            self._scheduled = True
            self._loop.call_soon(self._schedule)

    def _pick(self) -> TaskPool | None:
        """The ready pool with the oldest request whose expert is free; forgets pools that
        are no longer ready (emptied, or their requests abandoned): they say so again."""
        best: TaskPool | None = None
        best_arrival = float("inf")
        now = time.monotonic()
        for pool in list(self._ready):
            arrival = pool.oldest()
            if arrival is None or pool.ready_at() > now:
                del self._ready[pool]
                pool.check()  # arms its timer again
            elif pool.uid not in self._busy and arrival < best_arrival:
                best, best_arrival = pool, arrival
        return best

    def _schedule(self) -> None:
        """Dispatch ready pools to free workers. A plain callback (on a pool's readiness, on
        batch completion): no task, no polling, nothing to do while idle."""
        self._scheduled = False
        while self._free and not self._closing:
            pool = self._pick()
            if pool is None:
                return
            self._dispatch(pool)

    def _dispatch(self, pool: TaskPool) -> None:
        batch = pool.take()
        runner = self._runners[pool]
        self._busy.add(pool.uid)
        self._free -= 1
        future = self._loop.run_in_executor(self._executor, _run, runner, batch)
        self._running.add(future)
        future.add_done_callback(lambda f: self._finished(pool, batch, f))

    def _finished(self, pool: TaskPool, batch: list[Task], future: asyncio.Future[Any]) -> None:
        self._running.discard(future)
        self._busy.discard(pool.uid)
        self._free += 1
        if not self._closing:
            self._schedule()
        outcome = unavailable("the server is shutting down") if future.cancelled() else None
        if outcome is None:
            outcome = future.result()
        for i, task in enumerate(batch):
            if task.future.done():
                continue  # the caller went away
            result = outcome if isinstance(outcome, ExpertError) else outcome[i]
            if isinstance(result, ExpertError):
                task.future.set_exception(result)
            else:
                task.future.set_result(result)

    async def on_each_thread(self, work: Callable[[], None]) -> None:
        """Run ``work`` once on every compute thread (e.g. a GPU warm-up: cuBLAS handles are
        per thread). Each call waits at a barrier, so no thread takes two of them."""
        barrier = threading.Barrier(self.workers)

        def call() -> None:
            barrier.wait(timeout=600)
            work()

        await asyncio.gather(
            *(self._loop.run_in_executor(self._executor, call) for _ in range(self.workers))
        )

    async def close(self) -> None:
        """Refuse queued requests (UNAVAILABLE), wait for running batches, stop the threads."""
        self._closing = True
        for pool in self._runners:
            for task in pool.close():
                if not task.future.done():
                    task.future.set_exception(unavailable("the server is shutting down"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=True)


def _run(runner: BatchRunner, batch: list[Task]) -> list[Any] | ExpertError:
    """A compute thread's job: every task's result, or one ``ExpertError`` for the whole batch
    when it raised (out of memory: RESOURCE_EXHAUSTED; a bug: INTERNAL, logged)."""
    try:
        return runner.run(batch)
    except Exception as exc:
        error = from_exception(exc, runner.backend.device, sum(task.rows for task in batch))
        if error.code == grpc.StatusCode.INTERNAL:
            log.exception("batch failed", extra={"expert": runner.backend.uid})
        return error
