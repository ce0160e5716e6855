"""What a DHT node checks of a peer's or a client's request, and the bound on its reply.

Every byte from a peer may be hostile, so ids, sizes, expirations and key counts are checked
before anything is stored or looked up; a failed check is a :class:`RequestRejected`, answered
with its gRPC status and message (the server guard and the link map it alike). Shared by the
peer handlers (:mod:`services.dht.ping_rpc`, :mod:`~services.dht.store_rpc`,
:mod:`~services.dht.find_rpc`) and the client-facing servicer (:mod:`services.dht.service`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from services.common.addresses import check_peer_address, peer_host
from services.common.errors import StatusError
from services.common.identity import PUBLIC_KEY_BYTES
from services.dht.records import Entry
from services.dht.routing import id_from_bytes
from services.proto import dht_pb2

if TYPE_CHECKING:
    from services.common.rejections import Rejections
    from services.dht.config import NodeConfig


class RequestRejected(StatusError):
    """Bad or unservable input to a DHT node; answered with its gRPC status and message."""


def invalid(message: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse_id(raw: bytes, what: str) -> int:
    try:
        return id_from_bytes(raw)
    except ValueError as exc:
        raise invalid(f"{what}: {exc}") from None


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def check_sender(
    sender: dht_pb2.NodeInfo, caller_host: str, rejections: Rejections
) -> tuple[int, str] | None:
    """Validate a peer request's caller: (claimed id, address to reach it), or None for a
    non-node caller. The claim is only a claim: the node verifies it before trusting it.

    A caller that announces a loopback host but called from elsewhere (a container
    started without ``--announce-host``) is recorded under the host it called from.
    """
    if not sender.node_id and not sender.address:
        return None
    node_id = parse_id(sender.node_id, "sender.node_id")
    try:
        check_peer_address(sender.address)
    except ValueError as exc:
        rejections.reject(
            "bad_address", "peer announced an address it cannot be reached at",
            source=caller_host, address=sender.address[:100],
        )  # fmt: skip
        raise invalid(f"sender.address {sender.address[:100]!r}: {exc}") from None
    if sender.public_key and hashlib.sha1(sender.public_key).digest() != sender.node_id:
        raise invalid("sender.node_id is not the SHA-1 of sender.public_key")
    address = sender.address
    host, _, port = address.rpartition(":")
    if _is_loopback(host) and caller_host and not _is_loopback(caller_host):
        address = f"[{caller_host}]:{port}" if ":" in caller_host else f"{caller_host}:{port}"
    return node_id, address


def parse_entry(
    entry: dht_pb2.ValueEntry, config: NodeConfig, where: str, now: float | None = None
) -> Entry:
    """Check sizes and expiration of a wire entry (``now``: the node's DHT time, for the
    ``max_ttl`` cap). Ownership is checked apart: it needs the key id."""
    subkey = entry.subkey if entry.HasField("subkey") else None
    if subkey is not None and len(subkey) > config.max_subkey_bytes:
        raise invalid(f"{where}: subkey is {len(subkey)} bytes, limit {config.max_subkey_bytes}")
    if len(entry.value) > config.max_value_bytes:
        raise invalid(f"{where}: value is {len(entry.value)} bytes, limit {config.max_value_bytes}")
    if not math.isfinite(entry.expiration):
        raise invalid(f"{where}: expiration must be a finite UNIX time")
    if now is not None and entry.expiration > now + config.max_ttl:
        raise invalid(
            f"{where}: expiration is {entry.expiration - now:.0f} s ahead of this node's "
            f"clock, limit {config.max_ttl:.0f} s (--max-ttl)"
        )
    if len(entry.owner) > PUBLIC_KEY_BYTES or len(entry.signature) > 2 * PUBLIC_KEY_BYTES:
        raise invalid(f"{where}: owner or signature too long")
    return Entry(subkey, entry.value, entry.expiration, entry.owner, entry.signature)


def check_batch(count: int, config: NodeConfig, what: str) -> None:
    if count > config.max_keys_per_request:
        raise invalid(f"{count} {what} in one request, limit {config.max_keys_per_request}")


def check_unique(keys: Sequence[Any], what: str) -> None:
    """A key named twice in one Get/Find would be answered twice: one request could make
    the node copy a large record thousands of times (honest callers ask each key once)."""
    if len(set(keys)) != len(keys):
        first: dict[Any, int] = {}
        for i, key in enumerate(keys):
            if key in first:
                raise invalid(f"{what}[{i}] repeats {what}[{first[key]}]; ask each key once")
            first[key] = i


def entry_bytes(entry: Entry) -> int:
    """About what an entry costs in a reply (for ``max_reply_bytes``)."""
    subkey = entry.subkey or b""
    return len(entry.value) + len(subkey) + len(entry.owner) + len(entry.signature) + 24


class ReplyBudget:
    """Counts the bytes of entries put in one reply; RESOURCE_EXHAUSTED past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def spend(self, entries: Sequence[Entry]) -> None:
        self.used += sum(entry_bytes(e) for e in entries)
        if self.limit and self.used > self.limit:
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"reply would hold over {self.limit} bytes of entries (--max-reply-bytes); "
                "ask for fewer keys at once",
            )


def caller_host(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` -> ``1.2.3.4``; ``ipv6:%5B::1%5D:5678`` -> ``::1``; else ''."""
    return peer_host(peer) or ""
