"""The error a dmoe handler raises to answer with a gRPC status.

Each service's refusals (a DHT store with a bad signature, an expert request with a wrong
shape, a queue that is full) are one exception type carrying the status code and the message
the caller reads, mapped to the wire in one place per transport (the unary servicers abort
with it; a peer link sends it as the request's error reply).
"""

from __future__ import annotations

import grpc


class StatusError(Exception):
    """Answer the request with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
