"""``DHTClient``: what the expert runtime and the trainer use to talk to the DHT.

One ``put`` or ``get`` is one request (``Put`` or ``Get``) to the first node that answers;
nodes are tried in the order given. Requests travel over the node's peer link
(``dmoe.DHT/Link``: one long-lived stream per node carrying every request, see
``services.common.link`` and docs/links.md), not as separate unary calls; the unary
``dmoe.DHT/Put`` and ``/Get`` stay for other clients (grpcurl, other languages). A channel is
cached per node and dropped after a connection failure (closed once calls still on it had
their deadline), so the next attempt dials again and re-resolves DNS (a restarted container
with a new IP is found; :mod:`services.common.channel_cache`). One client may serve successive
event loops (``asyncio.run`` calls): on a new loop it dials afresh; close it before each loop
ends (``async with`` inside the run; it can be used again) so nothing of it outlives the loop.
Invalid input is a ``ValueError`` carrying the server's message; no node answering is
:class:`DHTUnavailable`; any other refusal is the :class:`~services.common.errors.CallError`
the node answered (``.code``, ``.message``).

Owned entries (:mod:`services.dht.records`): ``put(..., owned=True)`` signs every item with
the client's identity, into the client's own slot of each key; ``get`` checks every owned
entry's signature again (a hostile DHT node cannot forge what this client accepts) and, with
``trusted`` keys, keeps only entries those keys own. Dropped entries are counted in
``rejected`` and logged (rate-limited). Every reply carries the node's clock: :meth:`now`
is this host's time corrected by it when the two differ by more than ``MAX_CLOCK_SKEW``
(:class:`~services.dht.clock.ReplyClock`), what expirations should be based on.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import grpc

from services.common.channel_cache import ChannelCache
from services.common.channels import channel_options
from services.common.errors import CallError
from services.common.identity import Identity
from services.common.link import LinkPool
from services.common.rejections import RateLimitedLog
from services.common.tls import TLSConfig
from services.dht.clock import ReplyClock
from services.dht.records import Entry, ownership_problem, sign_entry
from services.dht.routing import id_to_bytes, key_to_id
from services.dht.wire import entry_to_proto
from services.proto import dht_pb2, dht_pb2_grpc

log = logging.getLogger(__name__)

Key = str | bytes
MAX_CLOCK_SKEW = 10.0  # seconds: a DHT clock further off than this is worth a warning


class ValueWithExpiration(NamedTuple):
    value: bytes
    expiration: float
    owner: bytes = b""  # the public key that signed it; empty: unowned


# What ``get`` returns per key: nothing, a plain value, or a dictionary whose subkeys each
# hold one entry per slot (one unowned, and one per owner: several servers declaring the same
# subkey side by side), latest expiration first.
Found = ValueWithExpiration | dict[bytes, list[ValueWithExpiration]] | None


class DHTUnavailable(ConnectionError):
    """No DHT node answered."""


_REPLIES: dict[str, Any] = {  # method -> its reply message class
    "Put": dht_pb2.PutResponse,
    "Get": dht_pb2.GetResponse,
    "NodeStatus": dht_pb2.NodeStatusResponse,
}
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
        *,
        identity: Identity | None = None,
        trusted: frozenset[bytes] | None = None,
        tls: TLSConfig | None = None,
    ) -> None:
        if isinstance(addresses, str):
            addresses = [a for a in addresses.replace(",", " ").split() if a]
        if not addresses:
            raise ValueError("DHTClient needs at least one node address")
        self.addresses = list(addresses)
        self.timeout = timeout
        # a channel per node; a dropped one closes once calls still on it had their deadline
        self._channels = ChannelCache(
            dht_pb2_grpc.DHTStub, channel_options(max_message_bytes), tls, grace=timeout
        )
        self.identity = identity
        self.trusted = trusted
        # one long-lived stream per node for every call (services.common.link)
        self._links = LinkPool(
            lambda a: self._channels.get(a).Link(), self._channels.forget, max(8, len(addresses))
        )
        self.clock = ReplyClock(MAX_CLOCK_SKEW)
        self.rejected: Counter[str] = Counter()  # entries dropped by get, per reason
        self._warn = RateLimitedLog(log)

    def now(self) -> float:
        """This host's time, corrected to the DHT's clock when it is off by more than
        ``MAX_CLOCK_SKEW`` (see :class:`ReplyClock`)."""
        return self.clock.now()

    def _clock(self, dht_time: float, sent: float) -> None:
        self.clock.observe(dht_time, sent)
        if self.clock.offset:
            self._warn.warn(
                "clock",
                "this host's clock differs from the DHT's; expirations use the DHT's clock",
                offset_s=round(self.clock.offset, 3),
            )

    async def __aenter__(self) -> DHTClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._links.close()
        await self._channels.close()

    async def _over_link(self, address: str, method: str, request: Any) -> Any:
        payload = await self._links.call(address, method, request.SerializeToString(), self.timeout)
        return _REPLIES[method].FromString(payload)

    async def _call(self, method: str, request: Any) -> Any:
        errors = []
        for address in self.addresses:
            try:
                return await self._over_link(address, method, request)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                errors.append(f"{address}: call cancelled")  # channel closed under us
                continue
            except CallError as exc:
                code = exc.code
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(exc.message) from None
                if code not in _RETRY_NEXT:
                    raise
                errors.append(f"{address}: {code.name} {exc.message}")
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._channels.forget(address)
        raise DHTUnavailable("no DHT node answered: " + "; ".join(errors))

    async def put(
        self, items: Iterable[tuple[Key, Key | None, bytes, float]], *, owned: bool = False
    ) -> list[bool]:
        """Store (key, subkey or None, value, absolute expiration) items in one request.

        ``owned``: sign every item with this client's identity, into its own slot (every
        item needs a subkey); nobody else can then overwrite or remove it.
        Returns, per item, whether at least one node accepted it (False: expired, an
        entry with a later expiration is held, or storage is full everywhere).
        """
        if owned and self.identity is None:
            raise ValueError("owned entries need a DHTClient with an identity")
        request = dht_pb2.PutRequest()
        for key, subkey, value, expiration in items:
            if not math.isfinite(expiration):
                raise ValueError("expiration must be a finite UNIX time")
            key_bytes = _as_bytes(key, "key")
            sub = None if subkey is None else _as_bytes(subkey, "subkey")
            if owned:
                if sub is None:
                    raise ValueError("owned entries need a subkey")
                assert self.identity is not None
                entry = sign_entry(
                    self.identity, id_to_bytes(key_to_id(key_bytes)), sub, bytes(value),
                    float(expiration),
                )  # fmt: skip
            else:
                entry = Entry(sub, bytes(value), float(expiration))
            request.items.append(dht_pb2.PutItem(key=key_bytes, entry=entry_to_proto(entry)))
        if not request.items:
            return []
        sent = self.clock.source()
        try:
            reply = await self._call("Put", request)
        except CallError as exc:
            if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            log.warning("DHT storage full, items not stored", extra={"details": exc.message})
            return [False] * len(request.items)
        self._clock(reply.dht_time, sent)
        return list(reply.stored)

    async def get(self, keys: Sequence[Key], latest: bool = False) -> dict[Key, Found]:
        """Look up many keys in one request; the result is keyed by each key exactly as given
        (see :data:`Found`). Entries whose ownership does not hold are dropped here."""
        keys = list(keys)
        if not keys:
            return {}
        raw = [_as_bytes(k, "key") for k in keys]
        unique = list(dict.fromkeys(raw))  # nodes refuse a key named twice
        request = dht_pb2.GetRequest(keys=unique, latest=latest)
        sent = self.clock.source()
        reply = await self._call("Get", request)
        if len(reply.results) != len(unique):
            raise DHTUnavailable("DHT node answered the wrong number of results")
        self._clock(reply.dht_time, sent)
        found = {
            key_bytes: self._found(key_bytes, result)
            for key_bytes, result in zip(unique, reply.results, strict=True)
        }
        return {key: found[key_bytes] for key, key_bytes in zip(keys, raw, strict=True)}

    def _found(self, key: bytes, result: dht_pb2.GetResult) -> Found:
        if not result.found or not result.entries:
            return None
        key_id = id_to_bytes(key_to_id(key))
        plain: ValueWithExpiration | None = None
        subkeys: dict[bytes, list[ValueWithExpiration]] = {}
        for e in result.entries:
            subkey = e.subkey if e.HasField("subkey") else None
            entry = Entry(subkey, e.value, e.expiration, e.owner, e.signature)
            problem = ownership_problem(key_id, entry, self.trusted)
            if problem:
                self.rejected[problem] += 1
                self._warn.warn(
                    problem, "dropped a DHT entry", reason=problem, key=key[:100].decode(
                        "utf-8", "replace"),
                )  # fmt: skip
                continue
            value = ValueWithExpiration(e.value, e.expiration, e.owner)
            if subkey is None:
                plain = value
            else:
                subkeys.setdefault(subkey, []).append(value)
        if subkeys:
            for values in subkeys.values():
                values.sort(key=lambda v: -v.expiration)
            return subkeys
        return plain
