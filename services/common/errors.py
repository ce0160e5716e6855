"""The error a dmoe handler raises to answer with a gRPC status.

Each service's refusals (a DHT store with a bad signature, an expert request with a wrong
shape, a queue that is full) are one exception type carrying the status code and the message
the caller reads. Handlers raise it and never call ``context.abort`` themselves: the one
mapping to the wire is :func:`status_of`, which both transports call (the server guard in
``services.common.server`` for unary and streaming calls, the link server in
``services.common.link`` for a request carried by a peer link), so a refusal reads the same
over both, and any other exception is INTERNAL with its traceback logged.

Anything a peer sent that a message repeats (a uid, a key, an address) goes through
:func:`echo`: a 16 MiB uid echoed whole was copied a dozen times on its way out (the
f-string, ``repr``, the status trailer, percent-encoded x3 in gRPC core) and the status was
larger than any client accepts. :class:`StatusError` also cuts any message to
``MAX_MESSAGE_CHARS`` as a backstop, and ``services.common.rejections`` its log lines.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)

ECHO_CHARS = 80  # of a peer's value repeated in a message
MAX_MESSAGE_CHARS = 1024  # of any status message or rejection log line


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """``repr`` of a peer's value cut to ``limit`` characters (and its length when cut):
    only the head is ever copied, however long the value."""
    if isinstance(value, str | bytes | bytearray | memoryview):
        head = bytes(value[:limit]) if not isinstance(value, str) else value[:limit]
        text = repr(head)[: limit + 3]  # escapes make a repr up to 4 x longer
        if len(value) > limit or len(text) < len(repr(head)):
            unit = "characters" if isinstance(value, str) else "bytes"
            text += f"... ({len(value)} {unit})"
        return text
    return clip(repr(value), limit)


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked when cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class StatusError(Exception):
    """Answer the request with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        message = clip(message)
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class CallError(StatusError):
    """A call to a peer failed with ``code`` (a ``grpc.StatusCode``, an attribute) and
    ``message``: the one exception every dmoe client raises, whether the request went over a
    peer link, a unary call or a stream (a ``grpc.aio.AioRpcError`` is wrapped by
    :meth:`of_rpc` at the client boundary), so callers match one type and read ``code`` the
    same way the server raised it."""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def of_rpc(cls, exc: grpc.aio.AioRpcError) -> CallError:
        """The same failure as a gRPC call raised it (its code and details)."""
        return cls(exc.code(), exc.details() or "")


def status_of(exc: BaseException, method: str, via: str = "") -> tuple[grpc.StatusCode, str]:
    """The status a caller gets for ``exc`` raised by the handler of ``method``: a
    :class:`StatusError`'s own code and message, exactly; anything else is a bug, answered
    INTERNAL with the exception's type and text, its traceback logged (``via`` says how the
    request came, for the log: ``" over a link"``)."""
    if isinstance(exc, StatusError):
        return exc.code, exc.message
    log.error("unhandled error in %s%s", method, via, exc_info=exc, extra={"method": method})
    return grpc.StatusCode.INTERNAL, clip(f"{type(exc).__name__}: {exc}")
