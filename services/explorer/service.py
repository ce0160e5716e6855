"""The explorer assembled: a collector round every period, the page and JSON it serves, and
the common gRPC bootstrap for health, reflection and ``/metrics``.

The explorer is a DHT client only: it writes nothing, holds no identity that owns anything,
and serves no dmoe RPC; its gRPC port carries ``grpc.health.v1`` (SERVING once the first
round has finished and the page is up) and reflection, like every service's, so probes and
the image's HEALTHCHECK are the same as elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from services.common.limits import ServerLimits
from services.common.rejections import Rejections
from services.common.server import RunningServer, start_server
from services.common.tls import TLSConfig
from services.dht.client import DHTClient
from services.explorer import render
from services.explorer.collect import Collector, Limits
from services.explorer.http import Body, HttpServer
from services.explorer.metrics import ExplorerMetrics
from services.explorer.peers import Peers

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".png": "image/png", ".svg": "image/svg+xml"}  # fmt: skip
MAX_DHT_REPLY_BYTES = 16 * 1024 * 1024


@dataclass
class ExplorerConfig:
    initial_peers: list[str]
    prefixes: list[str] = field(default_factory=list)
    period: float = 5.0
    rpc_timeout: float = 3.0
    concurrency: int = 32
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"
    port: int = 0
    http_host: str | None = None  # None: --host
    http_port: int = 8080
    metrics_port: int | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    tls: TLSConfig | None = None
    trusted: frozenset[bytes] | None = None  # only entries these keys own (a private swarm)
    server_limits: ServerLimits = field(default_factory=ServerLimits)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (peers may send NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class Explorer:
    def __init__(self, config: ExplorerConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.metrics = ExplorerMetrics(self.registry)
        self.rejections = Rejections("explorer", self.registry, log)
        self.snapshot: dict[str, Any] | None = None
        self.first_round = asyncio.Event()
        self.http_port = 0
        self.running: RunningServer | None = None
        self._bodies: dict[str, Body] = {}
        self._static = {
            f"/static/{p.name}": Body(p.read_bytes(), STATIC_TYPES[p.suffix], "max-age=300")
            for p in STATIC.iterdir()
            if p.suffix in STATIC_TYPES
        }
        self._publish(None)
        self.dht = DHTClient(
            config.initial_peers,
            timeout=config.rpc_timeout,
            max_message_bytes=MAX_DHT_REPLY_BYTES,
            trusted=config.trusted,
            tls=config.tls,
        )
        self.peers = Peers(config.rpc_timeout, config.concurrency, config.tls)
        self.collector = Collector(
            self.dht,
            self.peers,
            config.initial_peers,
            config.prefixes,
            config.limits,
            self.rejections,
            config.period,
        )
        self.http = HttpServer(self._route, self._count)
        self._task: asyncio.Task[None] | None = None
        self._serving_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- serving
    def _route(self, path: str) -> Body | None:
        return self._bodies.get(path) or self._static.get(path)

    def _count(self, route: str, code: int) -> None:
        self.metrics.http_requests.labels(route, str(code)).inc()

    def _publish(self, snapshot: dict[str, Any] | None) -> None:
        """Render once per round what every request then serves."""
        html = "text/html; charset=utf-8"
        empty: dict[str, list[Any]] = {
            k: [] for k in ("grids", "experts", "servers", "trainers", "dht_nodes")
        }
        api = _clean(snapshot) if snapshot is not None else {"updated": None, **empty}
        self._bodies = {
            "/": Body(render.page(snapshot).encode(), html),
            "/fragment": Body(render.fragment(snapshot).encode(), html),
            "/api/swarm": Body(json.dumps(api, separators=(",", ":")).encode(), "application/json"),
            "/healthz": Body(b"ok\n", "text/plain"),
        }
        self.snapshot = snapshot

    def _failed_round(self, exc: BaseException) -> None:
        self.metrics.rounds.labels("failed").inc()
        log.warning("round failed", extra={"error": repr(exc)[:300]})
        if self.snapshot is not None:
            self._publish(dict(self.snapshot, errors=[f"last round failed: {exc!r}"[:300]]))

    async def _loop(self) -> None:
        period = self.config.period
        while True:
            started = time.monotonic()
            try:
                snapshot = await asyncio.wait_for(self.collector.round(), max(30.0, 6 * period))
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # stopping
                self._failed_round(exc)  # a cancellation from inside the round: keep going
            except Exception as exc:  # one bad round must not stop the page
                self._failed_round(exc)
            else:
                self.metrics.rounds.labels("ok").inc()
                self.metrics.observe(snapshot)
                self._publish(snapshot)
            elapsed = time.monotonic() - started
            self.metrics.round_duration.observe(elapsed)
            self.first_round.set()
            await asyncio.sleep(max(0.2, period - elapsed))

    # ---------------------------------------------------------------- life
    async def start(self) -> Explorer:
        cfg = self.config
        self.running = await start_server(
            "explorer",
            lambda server: [],
            host=cfg.host,
            port=cfg.port,
            metrics_port=cfg.metrics_port,
            max_message_bytes=cfg.max_message_bytes,
            registry=self.registry,
            tls=cfg.tls,
            limits=cfg.server_limits,
        )
        self.http_port = await self.http.start(cfg.http_host or cfg.host, cfg.http_port)
        self._task = asyncio.create_task(self._loop(), name="explorer-rounds")
        self._serving_task = asyncio.create_task(self._serving_after_first_round())
        log.info(
            "explorer started",
            extra={
                "http_port": self.http_port,
                "port": self.running.port,
                "metrics_port": self.running.metrics_port,
                "initial_peers": ",".join(cfg.initial_peers),
                "prefixes": ",".join(cfg.prefixes) or "announced",
                "period": cfg.period,
            },
        )
        return self

    async def _serving_after_first_round(self) -> None:
        await self.first_round.wait()
        if self.running is not None:
            await self.running.set_serving(True)

    async def stop(self, grace: float = 5.0) -> None:
        for task in (self._task, self._serving_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.http.stop()
        if self.running is not None:
            await self.running.stop(grace)
        await self.peers.close()
        await self.dht.close()
        log.info("explorer stopped")
