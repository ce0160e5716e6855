"""The error a dmoe handler raises to answer with a gRPC status.

Each service's refusals (a DHT store with a bad signature, an expert request with a wrong
shape, a queue that is full) are one exception type carrying the status code and the message
the caller reads, mapped to the wire in one place per transport (the unary servicers abort
with it; a peer link sends it as the request's error reply).

Anything a peer sent that a message repeats (a uid, a key, an address) goes through
:func:`echo`: a 16 MiB uid echoed whole was copied a dozen times on its way out (the
f-string, ``repr``, the status trailer, percent-encoded x3 in gRPC core) and the status was
larger than any client accepts. :class:`StatusError` also cuts any message to
``MAX_MESSAGE_CHARS`` as a backstop, and ``services.common.rejections`` its log lines.
"""

from __future__ import annotations

import grpc

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
