"""Every gRPC channel a dmoe process opens, and the options servers and channels share.

One place for both, so a server and the clients that call it agree on message-size limits and
keepalive, and every client honours the process's TLS setting (``services.common.tls`` holds the
TLS configuration and credentials; this module only applies them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from services.common.tls import TLSConfig


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options shared by servers and client channels."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def aio_channel(
    address: str, options: Sequence[tuple[str, Any]], tls: TLSConfig | None = None
) -> grpc.aio.Channel:
    """The one way services open a ``grpc.aio`` channel: plaintext when ``tls`` is None."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(
        address, tls.channel_credentials(), options=tls.with_server_name(options)
    )


def sync_channel(
    address: str, options: Sequence[tuple[str, Any]] = (), tls: TLSConfig | None = None
) -> grpc.Channel:
    """The blocking twin of :func:`aio_channel` (healthcheck CLI, test helpers)."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(
        address, tls.channel_credentials(), options=tls.with_server_name(options)
    )
