"""Per-expert, per-method queues of requests waiting for their batch.

A pool is a bounded queue and nothing else: it never computes and knows no scheduler. It calls
``on_ready(pool)`` when it becomes *ready*, and its owner (``runtime.DeviceScheduler``) then
takes a batch from it with :meth:`TaskPool.take` and runs it (``batch_runner.py``).

Readiness (dynamic batching as in Triton, with hivemind's minimum batch size, bounded):

- a pool holding at least ``min_batch_size`` samples is ready at once;
- a pool holding fewer is ready once its oldest request has waited ``batch_timeout``, whatever
  it holds: the timeout bounds every request's wait for company, so a lone request is never
  stuck (hivemind waits for ``min_batch_size`` without bound).

``min_batch_size`` defaults to ``max_batch_size``: wait up to the timeout for a full batch. A
smaller value runs batches of that size without waiting, e.g. a GPU server with a long timeout
that should not wait once a batch is worth a kernel launch. A batch takes the oldest request and
the later ones with the same non-batch shapes (a variable sequence length cannot be
concatenated), in arrival order, up to ``max_batch_size`` samples.

The queue is bounded twice: in samples (what a batch is cut from) and in bytes (what the queued
requests hold in memory: a request's rows can be long sequences). Everything here runs on the
event loop, so nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from services.expert.errors import exhausted, unavailable
from services.expert.metrics import ExpertMetrics
from services.expert.wire import WireTensor

FORWARD, BACKWARD = "forward", "backward"


@dataclass(eq=False)
class Task:
    """One request waiting for its batch. ``reply`` turns its outputs into the answer on the
    compute thread, so encoding the reply does not occupy the event loop."""

    tensors: list[WireTensor]
    rows: int
    nbytes: int
    reply: Callable[[list[torch.Tensor]], Any]
    future: asyncio.Future[Any]
    arrived: float = field(default_factory=time.monotonic)

    @property
    def signature(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.shape[1:]) for t in self.tensors)


class TaskPool:
    def __init__(
        self,
        uid: str,
        method: str,
        *,
        max_batch_size: int,
        batch_timeout: float,
        max_queue_samples: int,
        max_queue_bytes: int,
        metrics: ExpertMetrics,
        on_ready: Callable[[TaskPool], None],
        min_batch_size: int = 0,
    ) -> None:
        """``min_batch_size`` 0: ``max_batch_size`` (wait up to the timeout for a full batch)."""
        if not 0 <= min_batch_size <= max_batch_size:
            raise ValueError(
                f"min_batch_size {min_batch_size} must be in [0, max_batch_size={max_batch_size}]"
            )
        self.uid = uid
        self.method = method
        self.max_batch_size = max_batch_size
        self.min_batch_size = min_batch_size or max_batch_size
        self.batch_timeout = batch_timeout
        self.max_queue_samples = max_queue_samples
        self.max_queue_bytes = max_queue_bytes
        self.on_ready = on_ready
        self.tasks: deque[Task] = deque()
        self.queued_rows = 0
        self.queued_bytes = 0
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        # metric children resolved once: ``labels()`` costs a lock and a dict lookup per call
        self._queued_gauge = metrics.queued_rows.labels(uid, method)
        self._queued_bytes_gauge = metrics.queued_bytes.labels(uid, method)
        self._wait = metrics.queue_wait.labels(method)

    def submit(
        self,
        tensors: list[WireTensor],
        rows: int,
        nbytes: int,
        reply: Callable[[list[torch.Tensor]], Any],
    ) -> asyncio.Future[Any]:
        """Queue a request of ``rows`` samples holding ``nbytes`` of tensor data; the future
        gets its reply or an ``ExpertError``. An empty queue takes any request (its size is
        bounded by the request limits)."""
        if self.closed:
            raise unavailable("the server is shutting down")
        if self.queued_rows + rows > self.max_queue_samples:
            raise exhausted(
                f"expert {self.uid} {self.method} queue is full "
                f"({self.queued_rows} samples waiting, bound {self.max_queue_samples}, "
                "--max-queue-samples); retry later",
                "queue_full",
            )
        if self.queued_bytes and self.queued_bytes + nbytes > self.max_queue_bytes:
            raise exhausted(
                f"expert {self.uid} {self.method} queue is full "
                f"({self.queued_bytes} bytes waiting, this request {nbytes}, bound "
                f"{self.max_queue_bytes}, --max-queue-bytes); retry later",
                "queue_full",
            )
        task = Task(tensors, rows, nbytes, reply, asyncio.get_running_loop().create_future())
        self.tasks.append(task)
        self._count(task, 1)
        self._gauges()
        self.check()
        return task.future

    # ---- readiness ----

    def oldest(self) -> float | None:
        """Arrival time of the oldest waiting request; None when none waits."""
        self._drop_abandoned()
        return self.tasks[0].arrived if self.tasks else None

    def ready_at(self) -> float:
        """Monotonic time at which the pool is ready (assumes it is not empty)."""
        first = self.tasks[0].arrived
        return first if self.queued_rows >= self.min_batch_size else first + self.batch_timeout

    def check(self) -> None:
        """Tell the owner if the pool is ready; otherwise make sure a timer will (the owner
        calls it too, for a pool that stopped being ready: its requests were abandoned)."""
        if self.oldest() is None:
            self._cancel_timer()
            return
        delay = self.ready_at() - time.monotonic()
        if delay <= 0:
            self._cancel_timer()
            self.on_ready(self)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        if not self.closed:
            self.check()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- batches ----

    def take(self) -> list[Task]:
        """Pop the next batch: the oldest task and later ones of the same shapes that fit."""
        self._drop_abandoned()
        first = self.tasks.popleft()
        batch, rows, signature = [first], first.rows, first.signature
        self._count(first, -1)
        kept: deque[Task] = deque()
        while self.tasks:
            task = self.tasks.popleft()
            if task.future.done():
                self._count(task, -1)
                continue
            if rows + task.rows > self.max_batch_size:
                kept.append(task)
                break
            if task.signature == signature:
                batch.append(task)
                rows += task.rows
                self._count(task, -1)
            else:
                kept.append(task)
        kept.extend(self.tasks)
        self.tasks = kept
        self._gauges()
        now = time.monotonic()
        for task in batch:
            self._wait.observe(now - task.arrived)
        self.check()  # what is left may be ready too, or needs its timer
        return batch

    def close(self) -> list[Task]:
        """Refuse new requests and hand back the ones still queued."""
        self.closed = True
        self._cancel_timer()
        left, self.tasks = list(self.tasks), deque()
        self.queued_rows = self.queued_bytes = 0
        self._gauges()
        return left

    # ---- bookkeeping ----

    def _count(self, task: Task, sign: int) -> None:
        self.queued_rows += sign * task.rows
        self.queued_bytes += sign * task.nbytes

    def _gauges(self) -> None:
        self._queued_gauge.set(self.queued_rows)
        self._queued_bytes_gauge.set(self.queued_bytes)

    def _drop_abandoned(self) -> None:
        """Forget requests whose caller went away (deadline, cancel) before they ran."""
        if self.tasks and self.tasks[0].future.done():
            while self.tasks and self.tasks[0].future.done():
                self._count(self.tasks.popleft(), -1)
            self._gauges()
