"""Peer links: many requests over one long-lived bidirectional gRPC stream (``proto/link.proto``).

A unary gRPC call pays, every time, for a new HTTP/2 stream, its metadata, a deadline timer and a
handful of Python call objects on both sides: most of the CPU a small request costs here
(figures: docs/dht.md, ``benchmarks/rpc_floor.py``). A link opens one stream per (caller, callee)
and sends each request as a :class:`LinkFrame` with an id; replies come back in any order,
matched by id. Frames are sent in batches (:class:`LinkBatch`): whatever queued up while the
previous stream message was being written leaves in the next one, so under load many requests
share the cost of one gRPC message, and an idle link adds no delay (no timer: the first frame
leaves at once). What the unary path guarantees, the link keeps per request:

- validation and a clear status per request: a bad request gets its own error reply, the stream
  and the other requests go on (:class:`LinkServer`);
- admission per request (rate, bytes in flight: :mod:`services.common.limits`), metrics per
  method and code, rejections counted, exactly as the guard does for unary calls (the stream
  itself counts as one open stream of its caller);
- per-request deadlines and cancellation on the caller's side (:class:`LinkClient`): a request
  whose deadline passes fails with DEADLINE_EXCEEDED and the callee is told to drop it;
- after a failure the stream is reopened on a fresh channel, so DNS is resolved again; TLS is
  the channel's.

Trade-off: one stream carries requests one after the other, so a large message delays the small
ones behind it (head-of-line blocking): callers send large payloads over their other paths
(the expert client's chunked streams); DHT messages are small.

Modules: :mod:`~services.common.link_server` (the callee's end, :class:`LinkServer`),
:mod:`~services.common.link_client` (the caller's, :class:`LinkClient`, :class:`LinkPool`),
:mod:`~services.common.link_outbox` (the batching both ends write through). This module
re-exports their public names, so callers import from one place.
"""

from services.common.link_client import CLOSE_WAIT, LinkClient, LinkPool
from services.common.link_outbox import MAX_BATCH_FRAMES
from services.common.link_server import (
    LinkMethod,
    LinkServer,
    link_method_handler,
    protobuf_method,
)

__all__ = [
    "CLOSE_WAIT",
    "MAX_BATCH_FRAMES",
    "LinkClient",
    "LinkMethod",
    "LinkPool",
    "LinkServer",
    "link_method_handler",
    "protobuf_method",
]
