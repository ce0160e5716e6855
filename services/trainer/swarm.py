"""The trainer's view of the swarm: DHT lookups, expert clients, back-off and metrics.

One :class:`Swarm` is shared by every DMoE layer of a model. It owns the background event loop
(``background_loop.py``) on which all DHT and expert clients live, one ``ExpertClient`` per
server address (a channel reused by all layers, forward and backward), a short cache of DHT
answers (beam search asks the same prefixes every step; a declaration lives for about two
update periods, so a cache of a second or two saves almost all lookups and delays noticing a
new expert by at most that), and the :class:`~services.trainer.backoff.Backoff` record.

Everything read from the DHT was written by somebody else, maybe a hostile peer: a
declaration is believed only when it is owned (signed by the server that made it; the DHT
client checks the signature), by a ``trusted`` key when the swarm is private, its subkey is
a coordinate and its value a ``host:port``. Anything else is skipped, counted in
``dmoe_trainer_rejected_total{reason}`` and logged once a minute per source: nothing a peer
writes can crash the trainer or make it dial something that is not a TCP peer.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import torch

from services.common.addresses import is_peer_address
from services.common.expert_keys import parse_coordinate
from services.common.identity import Identity
from services.common.rejections import RateLimitedLog, Rejections
from services.common.tls import TLSConfig
from services.proto import expert_pb2, tensor_pb2
from services.trainer.background_loop import BackgroundLoop
from services.trainer.backoff import Backoff
from services.trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# coordinate -> [(address, expiration)]: every server that declared it
Children = dict[int, list[tuple[str, float]]]


class Swarm:
    """Connections to a DHT and to the expert servers it names.

    ``initial_peers``: DHT nodes (``host:port``), or None for a model that only uses
    :class:`~services.trainer.remote_expert.RemoteExpert` with explicit addresses.
    ``client_factory(address)`` replaces the default ``ExpertClient`` (same async interface),
    e.g. to add tracing or another transport. ``tls``: every DHT and expert channel uses it
    (``services.common.tls``; None: plaintext).
    """

    def __init__(
        self,
        initial_peers: Sequence[str] | None,
        *,
        dht_timeout: float = 5.0,
        cache_ttl: float = 2.0,
        negative_cache_ttl: float = 10.0,
        backoff: Backoff | None = None,
        metrics: TrainerMetrics | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        compression: tensor_pb2.Compression = tensor_pb2.COMPRESSION_NONE,
        client_factory: Callable[[str], Any] | None = None,
        trusted: frozenset[bytes] | None = None,
        identity: Identity | None = None,
        tls: TLSConfig | None = None,
    ) -> None:
        self.loop = BackgroundLoop()
        self._client_factory = client_factory
        self.initial_peers = list(initial_peers or [])
        self.dht_timeout = dht_timeout
        self.cache_ttl = cache_ttl
        self.negative_cache_ttl = negative_cache_ttl
        self.backoff = backoff if backoff is not None else Backoff()
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.compression = compression
        self.trusted = trusted  # only experts declared by these keys (a private swarm)
        self.identity = identity
        self.rejections = (
            Rejections.of("trainer", metrics.registry, log)
            if metrics is not None
            else Rejections("trainer", None, log)
        )
        self.tls = tls
        self.warnings = RateLimitedLog(log)  # failing experts, missing experts
        self._dht: Any = None
        self._clients: dict[str, Any] = {}
        self._cache: dict[str, tuple[float, Children]] = {}
        self._infos: dict[str, expert_pb2.InfoResponse] = {}

    # ---- running coroutines from synchronous code -------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.loop.run(coro, timeout)

    # ---- DHT ---------------------------------------------------------------------------------
    def _dht_client(self) -> Any:
        if self._dht is None:
            if not self.initial_peers:
                raise RuntimeError("this Swarm has no DHT peers (initial_peers)")
            from services.dht.client import DHTClient

            self._dht = DHTClient(
                self.initial_peers,
                timeout=self.dht_timeout,
                identity=self.identity,
                trusted=self.trusted,
                tls=self.tls,
            )
        return self._dht

    async def children(self, prefixes: list[str]) -> dict[str, dict[int, list[str]]]:
        """Live next coordinates under each prefix and the servers that declared them,
        ``{prefix: {coord: [address, ...]}}`` (several servers may host one expert).

        One batched DHT get for the prefixes not answered by the cache. When the DHT cannot
        be reached, a stale cached answer (still unexpired values only) is used if there is one.
        """
        from services.dht.client import DHTUnavailable

        now = time.time()
        missing = [p for p in prefixes if not self._fresh(p, now)]
        if missing:
            try:
                found = await self._dht_client().get(missing)
            except DHTUnavailable:
                if any(p not in self._cache for p in missing):
                    raise
                log.warning(
                    "DHT unreachable, using cached expert lists", extra={"keys": len(missing)}
                )
            else:
                for prefix in missing:
                    self._cache[prefix] = (now, self._declarations(prefix, found.get(prefix), now))
        # replicas in random order: spreads the load, and a stranger who declares the same
        # expert with a far expiration cannot put its own server first
        result: dict[str, dict[int, list[str]]] = {}
        for prefix in prefixes:
            live: dict[int, list[str]] = {}
            for coord, servers in self._cache[prefix][1].items():
                addresses = [address for address, exp in servers if exp > now]
                if addresses:
                    live[coord] = random.sample(addresses, len(addresses))
            result[prefix] = live
        return result

    def _fresh(self, prefix: str, now: float) -> bool:
        """Whether the cached answer for ``prefix`` may be reused. An empty answer is kept
        longer (negative caching, as hivemind does): a prefix declared alive one level up but
        with nothing live below (stale or bogus declarations) would otherwise cost a DHT key
        every step."""
        held = self._cache.get(prefix)
        if held is None:
            return False
        age = now - held[0]
        ttl = self.cache_ttl if held[1] else max(self.cache_ttl, self.negative_cache_ttl)
        return age < ttl

    def _declarations(self, prefix: str, value: Any, now: float) -> Children:
        """The believable declarations in one DHT answer (see the module docstring)."""
        children: Children = {}
        if value is None:
            return children
        if not isinstance(value, dict):
            self.rejections.reject("not_a_dictionary", "a plain value under an expert prefix",
                                   source=prefix)  # fmt: skip
            return children
        for subkey, entries in value.items():
            coord = parse_coordinate(subkey)
            for entry in entries:
                source = entry.owner.hex()[:16] or "unowned"
                reason = ""
                if coord is None:
                    reason = "bad_coordinate"
                elif not entry.owner:
                    reason = "unowned_declaration"
                else:
                    try:
                        address = entry.value.decode("ascii")
                    except UnicodeDecodeError:
                        address = ""
                    if not is_peer_address(address):
                        reason = "bad_address"
                if reason:
                    self.rejections.reject(
                        reason, "skipped an expert declaration", source=source, prefix=prefix,
                        subkey=subkey[:40].decode("utf-8", "replace"),
                    )  # fmt: skip
                    continue
                if entry.expiration > now and coord is not None:  # (no reason: coord is set)
                    children.setdefault(coord, []).append((address, entry.expiration))
        return children

    # ---- experts -----------------------------------------------------------------------------
    def client(self, address: str) -> Any:
        """The (cached) ExpertClient of ``address``; call on the background loop only."""
        client = self._clients.get(address)
        if client is None:
            if self._client_factory is not None:
                client = self._client_factory(address)
            else:
                from services.expert.client import ExpertClient

                client = ExpertClient(
                    address, max_message_bytes=self.max_message_bytes, tls=self.tls
                )
            self._clients[address] = client
        return client

    async def info(self, uid: str, address: str) -> expert_pb2.InfoResponse:
        key = f"{address}/{uid}"
        if key not in self._infos:
            self._infos[key] = await self.client(address).info(uid)
        return self._infos[key]

    async def forward(
        self, uid: str, address: str, inputs: list[torch.Tensor], timeout: float
    ) -> list[torch.Tensor]:
        return await self._timed(
            "forward",
            self.client(address).forward(
                uid, inputs, timeout=timeout, compression=self.compression
            ),
        )

    async def backward(
        self,
        uid: str,
        address: str,
        inputs: list[torch.Tensor],
        grad_outputs: list[torch.Tensor],
        timeout: float,
    ) -> list[torch.Tensor]:
        return await self._timed(
            "backward",
            self.client(address).backward(
                uid, inputs, grad_outputs, timeout=timeout, compression=self.compression
            ),
        )

    async def _timed(self, method: str, call: Coroutine[Any, Any, T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        finally:
            if self.metrics is not None:
                self.metrics.expert_call.labels(method).observe(time.perf_counter() - started)

    def record_failure(self, method: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.expert_failures.labels(method, reason).inc()

    def expert_failed(self, uid: str, address: str, method: str, reason: str, detail: str) -> None:
        """Count a dropped expert call and tell the operator: a warning at most once a
        minute per server, method and reason (a dead server fails every step)."""
        self.record_failure(method, reason)
        self.warnings.warn(
            ("expert", address, method, reason),
            "expert call failed",
            uid=uid, address=address, method=method, reason=reason, detail=detail[:200],
        )  # fmt: skip

    # ---- lifetime ----------------------------------------------------------------------------
    async def _close_clients(self) -> None:
        for client in self._clients.values():
            try:
                await client.close()
            except Exception:
                log.debug("closing an expert client failed", exc_info=True)
        self._clients.clear()
        if self._dht is not None:
            try:
                await self._dht.close()
            except Exception:
                log.debug("closing the DHT client failed", exc_info=True)
            self._dht = None

    def close(self) -> None:
        try:
            self.loop.run(self._close_clients(), timeout=5.0)
        except Exception:
            log.debug("closing clients failed", exc_info=True)
        self.loop.close()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
