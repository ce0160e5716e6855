"""The expert service's one error type: every refusal or failure carries its gRPC status.

Each module raises :class:`ExpertError` where it finds the problem (the handler, validation, the
queue bounds, the batch, the optimizer step) with the status the caller gets and, for refused
input, the ``reason`` it is counted under in ``dmoe_expert_rejected_total{reason}``.
It is a ``StatusError``: the handlers raise it (``ExpertServicer._refused`` counts refused
input first) and the server guard or the link server turns it into the gRPC status
(``services.common.errors.status_of``, the same for every service).
Exceptions that are not an ``ExpertError`` (out of memory, a bug) are mapped by
:func:`from_exception` on the compute thread, where the batch that raised them ran.

A subclass exists only where the behaviour differs: :class:`StepRejected` makes the batch
runner retry a batch in halves to isolate the requests that caused it.
"""

from __future__ import annotations

import grpc
import torch

from services.common.errors import StatusError


class ExpertError(StatusError):
    """Answer ``code`` with the message; ``reason`` counts it as refused input (None: not)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None) -> None:
        super().__init__(code, message)
        self.reason = reason


def invalid(message: str, reason: str = "malformed") -> ExpertError:
    """A request that does not fit the expert or its limits (INVALID_ARGUMENT)."""
    return ExpertError(grpc.StatusCode.INVALID_ARGUMENT, message, reason)


def exhausted(message: str, reason: str) -> ExpertError:
    """A request the server has no room for now (RESOURCE_EXHAUSTED): retry later or smaller."""
    return ExpertError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason)


def unavailable(message: str) -> ExpertError:
    """The server cannot serve now (shutting down, simulated failure): try another one."""
    return ExpertError(grpc.StatusCode.UNAVAILABLE, message)


def not_found(message: str) -> ExpertError:
    """An expert uid this server does not host."""
    return ExpertError(grpc.StatusCode.NOT_FOUND, message)


class StepRejected(ExpertError):
    """The optimizer step of a batch was refused or undone; weights and state are as before.

    ``cause`` labels ``dmoe_expert_steps_rejected_total{reason}``: ``nonfinite_gradient`` (the
    gradient norm overflowed; nothing was applied) or ``nonfinite_result`` (the step left a
    non-finite value and was undone).
    """

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message, "nonfinite_step")
        self.cause = cause


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocators ran out: the CUDA one raises ``torch.OutOfMemoryError``, the CPU one
    a plain ``RuntimeError`` that says so."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def from_exception(exc: Exception, device: torch.device, rows: int) -> ExpertError:
    """What every request of a batch of ``rows`` samples that raised ``exc`` is answered.

    An ``ExpertError`` as is; out of memory is RESOURCE_EXHAUSTED (the request may fit later,
    or in smaller batches); anything else is INTERNAL with the exception's text. The result
    does not chain ``exc``: its traceback holds the failed batch's tensors (device memory).
    """
    if isinstance(exc, ExpertError):
        return exc
    if is_out_of_memory(exc):
        return exhausted(
            f"the expert ran out of {device.type} memory computing a batch of {rows} samples; "
            "retry with fewer samples per request, or run the server with a lower "
            "--max-batch-size",
            "out_of_memory",
        )
    return ExpertError(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
