"""The trainer's view of the swarm: DHT lookups, expert clients, back-off and metrics.

One :class:`Swarm` is shared by every DMoE layer of a model. It owns the background event loop
(``background_loop.py``) on which all DHT and expert clients live, one ``ExpertClient`` per
server address (a channel reused by all layers, forward and backward), a short cache of DHT
answers (beam search asks the same prefixes every step; a declaration lives for about two
update periods, so a cache of a second or two saves almost all lookups and delays noticing a
new expert by at most that), and the :class:`~services.trainer.backoff.Backoff` record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import torch

from services.common.tls import TLSConfig
from services.proto import expert_pb2, tensor_pb2
from services.trainer.background_loop import BackgroundLoop
from services.trainer.backoff import Backoff
from services.trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
        backoff: Backoff | None = None,
        metrics: TrainerMetrics | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        compression: int = tensor_pb2.COMPRESSION_NONE,
        client_factory: Callable[[str], Any] | None = None,
        tls: TLSConfig | None = None,
    ) -> None:
        self.loop = BackgroundLoop()
        self._client_factory = client_factory
        self.initial_peers = list(initial_peers or [])
        self.dht_timeout = dht_timeout
        self.cache_ttl = cache_ttl
        self.backoff = backoff if backoff is not None else Backoff()
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.compression = compression
        self.tls = tls
        self._dht: Any = None
        self._clients: dict[str, Any] = {}
        self._cache: dict[str, tuple[float, dict[int, tuple[str, float]]]] = {}
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

            self._dht = DHTClient(self.initial_peers, timeout=self.dht_timeout, tls=self.tls)
        return self._dht

    async def children(self, prefixes: list[str]) -> dict[str, dict[int, str]]:
        """Live next coordinates under each prefix, ``{prefix: {coord: address}}``.

        One batched DHT get for the prefixes not answered by the cache. When the DHT cannot
        be reached, a stale cached answer (still unexpired values only) is used if there is one.
        """
        now = time.time()
        result: dict[str, dict[int, str]] = {}
        missing: list[str] = []
        for prefix in prefixes:
            cached = self._cache.get(prefix)
            if cached is not None and now - cached[0] < self.cache_ttl:
                result[prefix] = {c: a for c, (a, exp) in cached[1].items() if exp > now}
            else:
                missing.append(prefix)
        if not missing:
            return result
        from services.dht.client import DHTUnavailable

        try:
            found = await self._dht_client().get(missing)
        except DHTUnavailable:
            stale = [p for p in missing if p in self._cache]
            if len(stale) < len(missing):
                raise
            log.warning("DHT unreachable, using cached expert lists", extra={"keys": len(stale)})
            for prefix in stale:
                result[prefix] = {
                    c: a for c, (a, exp) in self._cache[prefix][1].items() if exp > now
                }
            return result
        for prefix in missing:
            entry: dict[int, tuple[str, float]] = {}
            value = found.get(prefix)
            if isinstance(value, dict):
                for subkey, item in value.items():
                    try:
                        coord = int(_text(subkey))
                    except ValueError:
                        continue
                    if coord >= 0 and item.expiration > now:
                        entry[coord] = (_text(item.value), item.expiration)
            self._cache[prefix] = (now, entry)
            result[prefix] = {c: a for c, (a, _exp) in entry.items()}
        return result

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
