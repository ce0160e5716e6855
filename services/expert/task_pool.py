"""Per-expert, per-method queues that turn concurrent requests into batches.

Dynamic batching as in Triton: a pool is *ready* once it holds ``max_batch_size`` samples or
its oldest request has waited ``batch_timeout``; the scheduler then takes as many queued
requests as fit, in arrival order, that share the oldest one's non-batch shapes (a variable
sequence length cannot be concatenated). The pool lives on the event loop; only
:meth:`TaskPool.run` runs on a compute thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from services.expert.backend import BadRequest, ExpertBackend
from services.expert.metrics import ExpertMetrics
from services.expert.wire import WireTensor

if TYPE_CHECKING:
    from services.expert.runtime import DeviceScheduler

FORWARD, BACKWARD = "forward", "backward"


class PoolFull(RuntimeError):
    """The pool's queue bound is reached (answered RESOURCE_EXHAUSTED)."""


class PoolClosed(RuntimeError):
    """The server is shutting down (answered UNAVAILABLE)."""


@dataclass(eq=False)
class Task:
    """One request waiting for its batch. ``reply`` turns its outputs into the answer on the
    compute thread, so encoding the reply does not occupy the event loop."""

    tensors: list[WireTensor]
    rows: int
    reply: Callable[[list[torch.Tensor]], Any]
    future: asyncio.Future[Any]
    arrived: float = field(default_factory=time.monotonic)

    @property
    def signature(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.shape[1:]) for t in self.tensors)


class TaskPool:
    def __init__(
        self,
        backend: ExpertBackend,
        method: str,
        *,
        batch_timeout: float,
        max_queue_samples: int,
        metrics: ExpertMetrics,
    ) -> None:
        self.backend = backend
        self.method = method
        self.max_batch_size = backend.max_batch_size
        self.batch_timeout = batch_timeout
        self.max_queue_samples = max_queue_samples
        self.metrics = metrics
        self.tasks: deque[Task] = deque()
        self.queued_rows = 0
        self.closed = False
        self.scheduler: DeviceScheduler | None = None
        self._queued_gauge = metrics.queued_rows.labels(backend.uid, method)
        # metric children resolved once: ``labels()`` costs a lock and a dict lookup per call
        self.m_wait = metrics.queue_wait.labels(method)
        self.m_compute = metrics.compute.labels(method)
        self.m_rows = metrics.batch_rows.labels(method)
        self.m_requests = metrics.batch_requests.labels(method)
        self.m_samples = metrics.samples.labels(backend.uid, method)
        self.m_steps = metrics.steps.labels(backend.uid)

    def submit(
        self, tensors: list[WireTensor], rows: int, reply: Callable[[list[torch.Tensor]], Any]
    ) -> asyncio.Future[Any]:
        if self.closed:
            raise PoolClosed("the server is shutting down")
        if self.queued_rows + rows > self.max_queue_samples:
            raise PoolFull(
                f"expert {self.backend.uid} {self.method} queue is full "
                f"({self.queued_rows} samples waiting, bound {self.max_queue_samples}); retry later"
            )
        task = Task(tensors, rows, reply, asyncio.get_running_loop().create_future())
        self.tasks.append(task)
        self.queued_rows += rows
        self._queued_gauge.set(self.queued_rows)
        if self.scheduler is not None:
            self.scheduler.notify()
        return task.future

    def _drop_abandoned(self) -> None:
        """Forget requests whose caller went away (deadline, cancel) before they ran."""
        while self.tasks and self.tasks[0].future.done():
            self.queued_rows -= self.tasks.popleft().rows

    def oldest(self) -> float | None:
        self._drop_abandoned()
        return self.tasks[0].arrived if self.tasks else None

    def ready_at(self) -> float:
        """Monotonic time at which the pool should run (assumes it is not empty)."""
        first = self.tasks[0].arrived
        return first if self.queued_rows >= self.max_batch_size else first + self.batch_timeout

    def take(self) -> list[Task]:
        """Pop the next batch: the oldest task and later ones of the same shapes that fit."""
        self._drop_abandoned()
        first = self.tasks.popleft()
        batch, rows, signature = [first], first.rows, first.signature
        kept: deque[Task] = deque()
        while self.tasks:
            task = self.tasks.popleft()
            if task.future.done():
                self.queued_rows -= task.rows
                continue
            if rows + task.rows > self.max_batch_size:
                kept.append(task)
                break
            if task.signature == signature:
                batch.append(task)
                rows += task.rows
            else:
                kept.append(task)
        kept.extend(self.tasks)
        self.tasks = kept
        self.queued_rows -= rows
        self._queued_gauge.set(self.queued_rows)
        return batch

    def close(self) -> list[Task]:
        """Refuse new requests and hand back the ones still queued."""
        self.closed = True
        left, self.tasks, self.queued_rows = list(self.tasks), deque(), 0
        self._queued_gauge.set(0)
        return left

    # ---- compute thread ----

    def run(self, batch: list[Task]) -> list[Any]:
        """Build the tensors, refuse non-finite requests, concatenate the rest, compute it,
        split the rows back and build each reply. Returns a reply or a ``BadRequest`` per task.
        """
        backend = self.backend
        results: list[Any] = [None] * len(batch)
        good: list[tuple[int, list[torch.Tensor]]] = []
        for k, task in enumerate(batch):
            try:
                good.append((k, [w.tensor() for w in task.tensors]))
            except ValueError as exc:
                results[k] = BadRequest(str(exc))
        width = len(batch[0].tensors)
        if len(good) > 1:
            tensors = [torch.cat([ts[i] for _, ts in good]) for i in range(width)]
            try:
                backend.check_finite(tensors)
            except BadRequest:  # find the culprits; the others still run together
                kept = []
                for k, ts in good:
                    try:
                        backend.check_finite(ts)
                        kept.append((k, ts))
                    except BadRequest as exc:
                        results[k] = exc
                good = kept
                tensors = (
                    [torch.cat([ts[i] for _, ts in good]) for i in range(width)] if good else []
                )
        elif good:
            tensors = good[0][1]
            try:
                backend.check_finite(tensors)
            except BadRequest as exc:
                results[good[0][0]] = exc
                good = []
        if not good:
            return results
        with backend.lock:
            if self.method == FORWARD:
                outputs = backend.forward(tensors)
            else:
                n_in = len(backend.input_schemas)
                outputs = backend.backward(tensors[:n_in], tensors[n_in:])
        if len(good) == 1:
            k = good[0][0]
            results[k] = batch[k].reply(outputs)
            return results
        sizes = [batch[k].rows for k, _ in good]
        parts = [out.split(sizes) for out in outputs]
        for j, (k, _) in enumerate(good):
            results[k] = batch[k].reply([p[j] for p in parts])
        return results
