"""Exit 0 when a dmoe service answers ``grpc.health.v1`` with SERVING, else 1.

Used as the container HEALTHCHECK: ``python -m services.common.healthcheck``
checks ``127.0.0.1:$DMOE_PORT`` by default, so one line serves every image. TLS comes
from ``--tls-*`` or the service's own ``DMOE_TLS_*`` variables, so in a TLS swarm the
check presents the container's certificate to its own server unchanged.
:func:`wait_serving` is the same check polled until a service started as a
subprocess (benchmarks, tests) is SERVING.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import sync_channel
from services.common.tls import TLSConfig, add_tls_flags, tls_from_args


def check(
    address: str, service: str = "", timeout: float = 3.0, tls: TLSConfig | None = None
) -> bool:
    try:
        with sync_channel(address, tls=tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        print(f"{address}: {exc.code().name} {exc.details()}", file=sys.stderr)
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(
    address: str,
    timeout: float,
    *,
    alive: Callable[[], bool] = lambda: True,
    interval: float = 0.2,
    tls: TLSConfig | None = None,
) -> bool:
    """Poll ``address`` until it answers SERVING (True), or until ``timeout`` passes or
    ``alive()`` turns false, e.g. the service's process exited (False). Quiet: a refused
    or failed check just means "not yet"."""
    deadline = time.monotonic() + timeout
    with sync_channel(address, tls=tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and alive():
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(interval)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = f"127.0.0.1:{os.environ.get('DMOE_PORT', '31330')}"
    parser.add_argument("--address", default=default, help="host:port (default: %(default)s)")
    parser.add_argument("--service", default="", help="service name; empty for the whole server")
    parser.add_argument("--timeout", type=float, default=3.0)
    add_tls_flags(parser, from_env=True)
    args = parser.parse_args(argv)
    tls = tls_from_args(args, parser, server=False)
    return 0 if check(args.address, args.service, args.timeout, tls) else 1


if __name__ == "__main__":
    sys.exit(main())
