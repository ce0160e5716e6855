"""Per-expert, per-method queues that turn concurrent requests into batches.

Dynamic batching as in Triton: a pool is *ready* once it holds ``max_batch_size`` samples or
its oldest request has waited ``batch_timeout``; the scheduler then takes as many queued
requests as fit, in arrival order, that share the oldest one's non-batch shapes (a variable
sequence length cannot be concatenated). The pool lives on the event loop; only
:meth:`TaskPool.run` runs on a compute thread.

The queue is bounded twice: in samples (what a batch is cut from) and in bytes (what the queued
requests hold in memory: a request's rows can be long sequences). A hostile request is cut out
of its batch, never failing its batch-mates: non-finite values and (backward) outlying gradient
norms before the batch runs, and a refused optimizer step by splitting the batch in halves until
only the culprits fail (an honest half gets its own step).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from services.expert.backend import BadRequest, ExpertBackend, StepRejected
from services.expert.grad_monitor import GradNormMonitor, rms
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
        backend: ExpertBackend,
        method: str,
        *,
        batch_timeout: float,
        max_queue_samples: int,
        max_queue_bytes: int,
        metrics: ExpertMetrics,
        monitor: GradNormMonitor | None = None,
    ) -> None:
        self.backend = backend
        self.method = method
        self.max_batch_size = backend.max_batch_size
        self.batch_timeout = batch_timeout
        self.max_queue_samples = max_queue_samples
        self.max_queue_bytes = max_queue_bytes
        self.metrics = metrics
        self.monitor = monitor if method == BACKWARD else None
        self.tasks: deque[Task] = deque()
        self.queued_rows = 0
        self.queued_bytes = 0
        self.closed = False
        self.scheduler: DeviceScheduler | None = None
        self._queued_gauge = metrics.queued_rows.labels(backend.uid, method)
        self._queued_bytes_gauge = metrics.queued_bytes.labels(backend.uid, method)
        self._steps_rejected: dict[str, Any] = {}
        # metric children resolved once: ``labels()`` costs a lock and a dict lookup per call
        self.m_wait = metrics.queue_wait.labels(method)
        self.m_compute = metrics.compute.labels(method)
        self.m_rows = metrics.batch_rows.labels(method)
        self.m_requests = metrics.batch_requests.labels(method)
        self.m_samples = metrics.samples.labels(backend.uid, method)
        self.m_steps = metrics.steps.labels(backend.uid)

    def submit(
        self,
        tensors: list[WireTensor],
        rows: int,
        nbytes: int,
        reply: Callable[[list[torch.Tensor]], Any],
    ) -> asyncio.Future[Any]:
        """Queue a request of ``rows`` samples holding ``nbytes`` of tensor data. An empty queue
        takes any request (its size is bounded by the request limits)."""
        if self.closed:
            raise PoolClosed("the server is shutting down")
        if self.queued_rows + rows > self.max_queue_samples:
            raise PoolFull(
                f"expert {self.backend.uid} {self.method} queue is full "
                f"({self.queued_rows} samples waiting, bound {self.max_queue_samples}, "
                "--max-queue-samples); retry later"
            )
        if self.queued_bytes and self.queued_bytes + nbytes > self.max_queue_bytes:
            raise PoolFull(
                f"expert {self.backend.uid} {self.method} queue is full "
                f"({self.queued_bytes} bytes waiting, this request {nbytes}, bound "
                f"{self.max_queue_bytes}, --max-queue-bytes); retry later"
            )
        task = Task(tensors, rows, nbytes, reply, asyncio.get_running_loop().create_future())
        self.tasks.append(task)
        self._count(task, 1)
        self._gauges()
        if self.scheduler is not None:
            self.scheduler.notify()
        return task.future

    def _count(self, task: Task, sign: int) -> None:
        self.queued_rows += sign * task.rows
        self.queued_bytes += sign * task.nbytes

    def _gauges(self) -> None:
        self._queued_gauge.set(self.queued_rows)
        self._queued_bytes_gauge.set(self.queued_bytes)

    def _drop_abandoned(self) -> None:
        """Forget requests whose caller went away (deadline, cancel) before they ran."""
        while self.tasks and self.tasks[0].future.done():
            self._count(self.tasks.popleft(), -1)

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
        return batch

    def close(self) -> list[Task]:
        """Refuse new requests and hand back the ones still queued."""
        self.closed = True
        left, self.tasks = list(self.tasks), deque()
        self.queued_rows = self.queued_bytes = 0
        self._gauges()
        return left

    # ---- compute thread ----

    def run(self, batch: list[Task]) -> list[Any]:
        """Build the tensors, cut out non-finite requests (and, for backward, outlying gradient
        norms), compute the rest together, split the rows back and build each reply. Returns a
        reply or a ``BadRequest`` per task."""
        results: list[Any] = [None] * len(batch)
        good: list[tuple[int, list[torch.Tensor]]] = []
        for k, task in enumerate(batch):
            try:
                good.append((k, [w.tensor() for w in task.tensors]))
            except ValueError as exc:
                results[k] = BadRequest(str(exc))
        tensors = self._concat(good)
        if good:
            try:
                self.backend.check_finite(tensors)  # once over the whole batch
            except BadRequest:  # find the culprits; the others still run together
                good, tensors = self._finite_only(good, results), None
        if good and self.monitor is not None:
            screened = self._screen(good, results)
            if len(screened) != len(good):
                good, tensors = screened, None
        if good:
            self._compute(batch, good, results, tensors)
        return results

    def _finite_only(
        self, good: list[tuple[int, list[torch.Tensor]]], results: list[Any]
    ) -> list[tuple[int, list[torch.Tensor]]]:
        kept = []
        for k, ts in good:
            try:
                self.backend.check_finite(ts)
                kept.append((k, ts))
            except BadRequest as exc:
                results[k] = exc
        return kept

    def _concat(self, good: list[tuple[int, list[torch.Tensor]]]) -> list[torch.Tensor]:
        if len(good) == 1:
            return good[0][1]
        width = len(good[0][1]) if good else 0
        return [torch.cat([ts[i] for _, ts in good]) for i in range(width)]

    def _screen(
        self, good: list[tuple[int, list[torch.Tensor]]], results: list[Any]
    ) -> list[tuple[int, list[torch.Tensor]]]:
        """Refuse requests whose grad_outputs RMS is an outlier (``grad_monitor``)."""
        assert self.monitor is not None
        n_in = len(self.backend.input_schemas)
        values = rms([ts[n_in:] for _, ts in good])
        flags, limit = self.monitor.screen(values)
        if not any(flags):
            return good
        kept = []
        for (k, ts), value, outlier in zip(good, values, flags, strict=True):
            if outlier:
                results[k] = BadRequest(
                    f"grad_outputs have an RMS of {value:.3g}, over {self.monitor.ratio:g} x "
                    f"the 90th percentile of this expert's recent requests (limit {limit:.3g}, "
                    "--max-grad-norm-ratio); refused so that no single request steers the "
                    "expert",
                    reason="grad_norm_outlier",
                )
            else:
                kept.append((k, ts))
        return kept

    def _compute(
        self,
        batch: list[Task],
        good: list[tuple[int, list[torch.Tensor]]],
        results: list[Any],
        tensors: list[torch.Tensor] | None = None,
    ) -> None:
        """Run ``good`` as one batch. A refused step (nothing applied) is retried on each half,
        down to single requests, so only the requests that cause it fail."""
        backend = self.backend
        if tensors is None:
            tensors = self._concat(good)
        try:
            with backend.lock:
                if self.method == FORWARD:
                    outputs = backend.forward(tensors)
                else:
                    n_in = len(backend.input_schemas)
                    outputs = backend.backward(tensors[:n_in], tensors[n_in:])
        except StepRejected as exc:
            self._step_rejected(exc.cause)
            if len(good) == 1:
                results[good[0][0]] = exc
                return
            half = len(good) // 2
            self._compute(batch, good[:half], results)
            self._compute(batch, good[half:], results)
            return
        except BadRequest as exc:  # the same for every request of these shapes
            for k, _ in good:
                results[k] = exc
            return
        if self.method == BACKWARD:
            self.m_steps.inc()
        if len(good) == 1:
            k = good[0][0]
            results[k] = batch[k].reply(outputs)
            return
        sizes = [batch[k].rows for k, _ in good]
        parts = [out.split(sizes) for out in outputs]
        for j, (k, _) in enumerate(good):
            results[k] = batch[k].reply([p[j] for p in parts])

    def _step_rejected(self, cause: str) -> None:
        child = self._steps_rejected.get(cause)
        if child is None:
            child = self._steps_rejected[cause] = self.metrics.steps_rejected.labels(
                self.backend.uid, cause
            )
        child.inc()
