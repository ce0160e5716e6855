"""``DHTClient``: what the expert runtime and the trainer use to talk to the DHT.

One ``put`` or ``get`` is one RPC (``dmoe.DHT/Put`` or ``/Get``) to the first node that
answers; nodes are tried in the order given. A channel is cached per node and dropped
after a connection failure, so the next attempt dials again and re-resolves DNS (a
restarted container with a new IP is found). Invalid input is a ``ValueError`` carrying
the server's message; no node answering is :class:`DHTUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import grpc

from services.common.server import channel_options
from services.common.tls import TLSConfig, aio_channel
from services.proto import dht_pb2, dht_pb2_grpc

log = logging.getLogger(__name__)

Key = str | bytes


class ValueWithExpiration(NamedTuple):
    value: bytes
    expiration: float


class DHTUnavailable(ConnectionError):
    """No DHT node answered."""


_RETRY_NEXT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


def _as_bytes(key: Key, what: str) -> bytes:
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    raise TypeError(f"{what} must be str or bytes, got {type(key).__name__}")


class DHTClient:
    """Client of one or more DHT nodes (``host:port``), tried in order."""

    def __init__(
        self,
        addresses: Sequence[str] | str,
        timeout: float = 5.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        tls: TLSConfig | None = None,
    ) -> None:
        if isinstance(addresses, str):
            addresses = [a for a in addresses.replace(",", " ").split() if a]
        if not addresses:
            raise ValueError("DHTClient needs at least one node address")
        self.addresses = list(addresses)
        self.timeout = timeout
        self._options = channel_options(max_message_bytes)
        self._tls = tls
        self._stubs: dict[str, tuple[grpc.aio.Channel, dht_pb2_grpc.DHTStub]] = {}
        self._closing: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> DHTClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        stubs, self._stubs = self._stubs, {}
        for channel, _ in stubs.values():
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _stub(self, address: str) -> dht_pb2_grpc.DHTStub:
        held = self._stubs.get(address)
        if held is None:
            channel = aio_channel(address, self._options, self._tls)
            held = (channel, dht_pb2_grpc.DHTStub(channel))
            self._stubs[address] = held
        return held[1]

    def _drop(self, address: str) -> None:
        """Forget a failed channel; close it once calls still on it had their deadline."""
        held = self._stubs.pop(address, None)
        if held is not None:
            task = asyncio.ensure_future(held[0].close(grace=self.timeout))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _call(self, method: str, request: Any) -> Any:
        errors = []
        for address in self.addresses:
            try:
                return await getattr(self._stub(address), method)(request, timeout=self.timeout)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                errors.append(f"{address}: call cancelled")  # channel closed under us
                continue
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(exc.details()) from None
                if code not in _RETRY_NEXT:
                    raise
                errors.append(f"{address}: {code.name} {exc.details()}")
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._drop(address)
        raise DHTUnavailable("no DHT node answered: " + "; ".join(errors))

    async def put(self, items: Iterable[tuple[Key, Key | None, bytes, float]]) -> list[bool]:
        """Store (key, subkey or None, value, absolute expiration) items in one RPC.

        Returns, per item, whether at least one node accepted it (False: expired, an
        entry with a later expiration is held, or storage is full everywhere).
        """
        request = dht_pb2.PutRequest()
        for key, subkey, value, expiration in items:
            if not math.isfinite(expiration):
                raise ValueError("expiration must be a finite UNIX time")
            entry = dht_pb2.ValueEntry(value=bytes(value), expiration=float(expiration))
            if subkey is not None:
                entry.subkey = _as_bytes(subkey, "subkey")
            request.items.append(dht_pb2.PutItem(key=_as_bytes(key, "key"), entry=entry))
        if not request.items:
            return []
        try:
            reply = await self._call("Put", request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            log.warning("DHT storage full, items not stored", extra={"details": exc.details()})
            return [False] * len(request.items)
        return list(reply.stored)

    async def get(
        self, keys: Sequence[Key], latest: bool = False
    ) -> dict[Key, ValueWithExpiration | dict[bytes, ValueWithExpiration] | None]:
        """Look up many keys in one RPC; the result is keyed by each key exactly as given."""
        keys = list(keys)
        if not keys:
            return {}
        request = dht_pb2.GetRequest(keys=[_as_bytes(k, "key") for k in keys], latest=latest)
        reply = await self._call("Get", request)
        if len(reply.results) != len(keys):
            raise DHTUnavailable("DHT node answered the wrong number of results")
        found: dict[Key, ValueWithExpiration | dict[bytes, ValueWithExpiration] | None] = {}
        for key, result in zip(keys, reply.results, strict=True):
            if not result.found or not result.entries:
                found[key] = None
            elif len(result.entries) == 1 and not result.entries[0].HasField("subkey"):
                entry = result.entries[0]
                found[key] = ValueWithExpiration(entry.value, entry.expiration)
            else:
                found[key] = {
                    e.subkey: ValueWithExpiration(e.value, e.expiration)
                    for e in result.entries
                    if e.HasField("subkey")
                }
        return found
