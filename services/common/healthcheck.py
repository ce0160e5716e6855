"""Exit 0 when a dmoe service answers ``grpc.health.v1`` with SERVING, else 1.

Used as the container HEALTHCHECK: ``python -m services.common.healthcheck``
checks ``127.0.0.1:$DMOE_PORT`` by default, so one line serves every image.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        print(f"{address}: {exc.code().name} {exc.details()}", file=sys.stderr)
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = f"127.0.0.1:{os.environ.get('DMOE_PORT', '31330')}"
    parser.add_argument("--address", default=default, help="host:port (default: %(default)s)")
    parser.add_argument("--service", default="", help="service name; empty for the whole server")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    return 0 if check(args.address, args.service, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
