"""The gRPC server bootstrap every dmoe service uses.

One call, :func:`start_server`, gives a ``grpc.aio`` server with
- ``grpc.health.v1`` health (NOT_SERVING until the service calls ``set_serving``),
- server reflection for every registered service,
- message-size limits on both directions,
- per-method request counters and latency histograms, and a guard around every handler
  (health and reflection too; :mod:`services.common.guard`) that turns a request that does
  not parse into INVALID_ARGUMENT, a raised ``StatusError`` into exactly its code and message,
  keeps a status the handler set on its context, and turns an unexpected exception into
  INTERNAL with a message and a logged traceback (``services.common.errors.status_of``, the mapping
  peer links share; docs/conventions.md: no handler lets one escape as UNKNOWN),
- admission limits (:class:`~services.common.limits.ServerLimits`): calls in flight, and per
  caller IP calls per second, open streams and request bytes held; past one,
  RESOURCE_EXHAUSTED, counted in ``dmoe_<service>_rejected_total{reason}``,
- a Prometheus ``/metrics`` HTTP port serving this instance's own registry, so many
  service instances can live in one process (tests, in-process swarms).

:func:`run_until_signal` runs a service until SIGTERM/SIGINT and stops it gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from services import __version__
from services.common.channels import channel_options
from services.common.guard import GuardInterceptor, RpcMetrics
from services.common.health_service import HealthServicer
from services.common.limits import Admission, ServerLimits
from services.common.link import LinkServer
from services.common.rejections import Rejections
from services.common.tls import TLSConfig

log = logging.getLogger(__name__)


def add_service(
    server: grpc.aio.Server, name: str, handlers: dict[str, grpc.RpcMethodHandler]
) -> list[str]:
    """Register a servicer written without generated stubs (its handlers by method name) and
    return the service names, as a ``start_server`` register function does."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
    return [name]


@dataclass
class RunningServer:
    """A started service: its gRPC server, ports, health state and metrics registry."""

    service: str
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    registry: CollectorRegistry
    health: health.aio.HealthServicer
    service_names: list[str]
    admission: Admission
    rejections: Rejections
    _metrics_http: Any = field(default=None, repr=False)

    async def set_serving(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight calls finish for ``grace`` s, close /metrics."""
        await self.set_serving(False)
        await self.server.stop(grace)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None


async def start_server(
    service: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int | None = 0,
    max_message_bytes: int = 64 * 1024 * 1024,
    registry: CollectorRegistry | None = None,
    metrics_host: str | None = None,
    tls: TLSConfig | None = None,
    limits: ServerLimits | None = None,
    links: Iterable[LinkServer] = (),
) -> RunningServer:
    """Start a guarded gRPC server for ``service`` (``dht``, ``expert``, ``trainer``).

    ``register(server)`` adds the service's servicers and returns their full names
    (``dmoe.DHT``) for health and reflection. ``metrics_port=None`` or ``-1`` serves no
    ``/metrics``; the registry is still filled, so tests can read it directly. ``tls``
    serves TLS (mutual TLS when it has a CA, see ``services.common.tls``); ``/metrics``
    stays plain HTTP either way. ``limits`` (default :class:`ServerLimits`'s) bound what the
    server admits; ``ServerLimits.from_args(args)`` gives what the ``service_parser`` flags say.
    ``links``: the :class:`~services.common.link.LinkServer` of each ``Link`` method, so the
    requests they carry are admitted and counted like unary calls.
    """
    registry = registry if registry is not None else CollectorRegistry()
    Gauge("dmoe_build_info", "Build information", ["service", "version"], registry=registry).labels(
        service, __version__
    ).set(1)
    admission = Admission(limits if limits is not None else ServerLimits())
    rejections = Rejections.of(service, registry, log)
    rpc_metrics = RpcMetrics(service, registry)
    guard = GuardInterceptor(rpc_metrics, admission, rejections)
    for link in links:
        link.bind(rpc_metrics, admission, rejections)
    server = grpc.aio.server(interceptors=[guard], options=channel_options(max_message_bytes))
    names = list(register(server))
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.server_credentials())
        log.info("gRPC port serves TLS", extra={"service": service, "mutual_tls": tls.mutual})
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {address}")
    await server.start()
    running = RunningServer(
        service, server, bound, None, registry, health_servicer, names, admission, rejections
    )
    await running.set_serving(False)
    if metrics_port is not None and metrics_port >= 0:
        http, _thread = start_http_server(
            metrics_port, addr=metrics_host or host, registry=registry
        )
        running._metrics_http = http
        running.metrics_port = http.server_port
    return running


async def run_until_signal(stop: Callable[[], Awaitable[None]]) -> None:
    """Block until SIGTERM or SIGINT, then await ``stop()`` once."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("signal received, stopping")
    await stop()
