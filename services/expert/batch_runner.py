"""One batch of one expert and method, run on a compute thread: requests in, replies out.

:meth:`BatchRunner.run`, step by step:

1. each request's tensors are built from its wire buffers (``WireTensor.tensor``: zero-copy
   views; a buffer that does not decode fails its own request only);
2. the requests are concatenated slot by slot (the one copy of the input data; on the CPU a
   lone request is used as is; on CUDA into page-locked buffers, :class:`PinnedStaging`);
3. non-finite values are refused: one check over the whole concatenation, per request only when
   it fails, so a NaN request is cut out and the others still run together;
4. backward: requests whose grad_outputs dwarf the expert's recent ones are refused
   (``grad_monitor.py``);
5. the expert computes under its lock: ``ExpertBackend.forward``, or ``ExpertBackend.backward``
   (recomputed forward, autograd, one all-or-nothing optimizer step). A refused step
   (``StepRejected``: nothing was applied) is retried on each half of the batch, down to single
   requests, so only the requests that cause it fail and every honest half gets its step;
6. the outputs come back to the host (on CUDA into page-locked buffers, one synchronize), are
   split by request, and each reply is encoded and serialized here, not on the event loop.

Each request's result is its reply or an ``ExpertError``. An exception that escapes (out of
memory, a bug) fails the whole batch; the scheduler maps it (``errors.from_exception``).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import torch

from services.expert.backend import ExpertBackend
from services.expert.errors import ExpertError, StepRejected, invalid
from services.expert.grad_monitor import GradNormMonitor, rms
from services.expert.metrics import ExpertMetrics
from services.expert.task_pool import BACKWARD, FORWARD, Task

Request = tuple[int, list[torch.Tensor]]  # (index in the batch, its tensors)


class BatchRunner:
    """Runs the batches of one expert and method; one batch at a time (the scheduler never
    runs two batches of one expert at once)."""

    def __init__(
        self,
        backend: ExpertBackend,
        method: str,
        metrics: ExpertMetrics,
        monitor: GradNormMonitor | None = None,
    ) -> None:
        self.backend = backend
        self.method = method
        self.monitor = monitor if method == BACKWARD else None
        self._inputs = len(backend.input_schemas)
        self._cuda = backend.device.type == "cuda"
        self._metrics = metrics
        # metric children resolved once: ``labels()`` costs a lock and a dict lookup per call
        self._compute_seconds = metrics.compute.labels(method)
        self._rows = metrics.batch_rows.labels(method)
        self._requests = metrics.batch_requests.labels(method)
        self._samples = metrics.samples.labels(backend.uid, method)
        self._steps = metrics.steps.labels(backend.uid)
        self._steps_rejected: dict[str, Any] = {}

    def run(self, batch: list[Task]) -> list[Any]:
        """A reply or an ``ExpertError`` per task (compute thread)."""
        started = time.perf_counter()
        results: list[Any] = [None] * len(batch)
        good: list[Request] = []
        for k, task in enumerate(batch):
            try:
                good.append((k, [w.tensor() for w in task.tensors]))
            except ValueError as exc:
                results[k] = invalid(str(exc))
        staging = thread_staging(self.backend.device) if self._cuda else None
        tensors: list[torch.Tensor] | None = None
        if good:
            tensors = self._concat(good, staging)
            try:
                self.backend.check_finite(tensors)  # once over the whole batch
            except ExpertError:  # find the culprits; the others still run together
                good, tensors = self._finite_only(good, results), None
        if good and self.monitor is not None:
            screened = self._screen(good, results)
            if len(screened) != len(good):
                good, tensors = screened, None
        if good:
            self._compute(batch, good, results, staging, tensors)
        self._record(batch, results, time.perf_counter() - started)
        return results

    def _concat(self, good: list[Request], staging: PinnedStaging | None) -> list[torch.Tensor]:
        parts = [tensors for _, tensors in good]
        if staging is not None:
            return staging.concat(parts)
        if len(parts) == 1:
            return parts[0]
        return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]

    def _finite_only(self, good: list[Request], results: list[Any]) -> list[Request]:
        kept = []
        for k, tensors in good:
            try:
                self.backend.check_finite(tensors)
                kept.append((k, tensors))
            except ExpertError as exc:
                results[k] = exc
        return kept

    def _screen(self, good: list[Request], results: list[Any]) -> list[Request]:
        """Refuse requests whose grad_outputs RMS is an outlier (``grad_monitor``)."""
        assert self.monitor is not None
        values = rms([tensors[self._inputs :] for _, tensors in good])
        flags, limit = self.monitor.screen(values)
        if not any(flags):
            return good
        kept = []
        for (k, tensors), value, outlier in zip(good, values, flags, strict=True):
            if outlier:
                results[k] = invalid(
                    f"grad_outputs have an RMS of {value:.3g}, over {self.monitor.ratio:g} x "
                    f"the 90th percentile of this expert's recent requests (limit {limit:.3g}, "
                    "--max-grad-norm-ratio); refused so that no single request steers the "
                    "expert",
                    "grad_norm_outlier",
                )
            else:
                kept.append((k, tensors))
        return kept

    def _compute(
        self,
        batch: list[Task],
        good: list[Request],
        results: list[Any],
        staging: PinnedStaging | None,
        tensors: list[torch.Tensor] | None = None,
    ) -> None:
        """Run ``good`` as one batch; a refused step is retried on each half."""
        backend = self.backend
        if tensors is None:
            tensors = self._concat(good, staging)
        if staging is not None:
            tensors = staging.upload(tensors)
        try:
            with backend.lock:
                if self.method == FORWARD:
                    outputs = backend.forward(tensors)
                else:
                    n = self._inputs
                    outputs = backend.backward(tensors[:n], tensors[n:])
        except StepRejected as exc:
            self._step_rejected(exc.cause)
            if len(good) == 1:
                results[good[0][0]] = exc
                return
            half = len(good) // 2
            self._compute(batch, good[:half], results, staging)
            self._compute(batch, good[half:], results, staging)
            return
        except ExpertError as exc:  # the same for every request of these shapes
            for k, _ in good:
                results[k] = exc
            return
        if staging is not None:
            outputs = staging.download(outputs)
        if self.method == BACKWARD:
            self._steps.inc()
        if len(good) == 1:
            k = good[0][0]
            results[k] = batch[k].reply(outputs)
            return
        sizes = [batch[k].rows for k, _ in good]
        parts = [out.split(sizes) for out in outputs]
        for j, (k, _) in enumerate(good):
            results[k] = batch[k].reply([p[j] for p in parts])

    def _record(self, batch: list[Task], results: list[Any], seconds: float) -> None:
        """Batch metrics over the requests that got a reply (none: nothing was computed)."""
        ok = [t for t, r in zip(batch, results, strict=True) if not isinstance(r, ExpertError)]
        if not ok:
            return
        rows = sum(task.rows for task in ok)
        self._compute_seconds.observe(seconds)
        self._rows.observe(rows)
        self._requests.observe(len(ok))
        self._samples.inc(rows)

    def _step_rejected(self, cause: str) -> None:
        child = self._steps_rejected.get(cause)
        if child is None:
            child = self._steps_rejected[cause] = self._metrics.steps_rejected.labels(
                self.backend.uid, cause
            )
        child.inc()


class PinnedStaging:
    """Page-locked host buffers through which one compute thread moves batches to and from a
    CUDA device.

    Request tensors are views of pageable wire buffers, and a copy from pageable memory to a GPU
    is staged by the driver and blocks the thread. Concatenating the requests straight into
    page-locked memory keeps that concatenation the only host copy and lets the copy to the
    device run asynchronously (``non_blocking``); outputs are copied back into page-locked
    buffers too, with one synchronize before the replies read them.

    One set per compute thread and device rather than per pool: a thread runs one batch at a
    time, and page-locked memory is a scarce, machine-wide resource, so this bounds it by
    compute threads x the largest batch instead of experts x methods x the largest batch.
    Buffers grow (doubling) to the largest batch seen and are kept.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._inputs: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []
        self._uploaded: Any = None  # torch.cuda.Event after the last copies to the device

    def concat(self, parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Each request's tensors (``parts``) concatenated slot by slot into the buffers."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the last batch's copies have left the buffers
            self._uploaded = None
        out = []
        for slot in range(len(parts[0])):
            pieces = [p[slot] for p in parts]
            shape = (sum(int(p.shape[0]) for p in pieces), *pieces[0].shape[1:])
            view = _buffer_view(self._inputs, slot, shape, pieces[0].dtype)
            torch.cat(pieces, out=view)
            out.append(view)
        return out

    def upload(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies on the device, queued without waiting."""
        moved = [t.to(self.device, non_blocking=True) for t in tensors]
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._uploaded = event
        return moved

    def download(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of device tensors, valid until this thread's next batch."""
        out = []
        for slot, tensor in enumerate(tensors):
            view = _buffer_view(self._outputs, slot, tuple(tensor.shape), tensor.dtype)
            view.copy_(tensor, non_blocking=True)
            out.append(view)
        torch.cuda.current_stream(self.device).synchronize()
        return out


def _buffer_view(
    buffers: list[torch.Tensor], slot: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A ``shape``/``dtype`` view of page-locked buffer ``slot``, grown when too small."""
    nbytes = math.prod(shape) * dtype.itemsize
    if slot == len(buffers):
        buffers.append(torch.empty(0, dtype=torch.uint8))
    if buffers[slot].numel() < nbytes:
        size = max(nbytes, 2 * buffers[slot].numel())
        buffers[slot] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    return buffers[slot][:nbytes].view(dtype).view(shape)


_threads = threading.local()


def thread_staging(device: torch.device) -> PinnedStaging:
    """The calling compute thread's :class:`PinnedStaging` for ``device``."""
    stagings: dict[torch.device, PinnedStaging] = _threads.__dict__.setdefault("stagings", {})
    staging = stagings.get(device)
    if staging is None:
        staging = stagings[device] = PinnedStaging(device)
    return staging
