"""The CPU cost of one bare grpc.aio unary call on this machine: the floor under every service.

A server process answers ``/floor.Echo/Echo`` by returning the first ``--reply-bytes`` of the
request from a handler that does nothing else (no interceptor, no metrics, no protobuf); a
client process sends ``--calls`` requests of ``--request-bytes`` with ``--concurrency`` calls
in flight. Both are separate OS processes, like the services and their callers. ``--api sync``
measures grpcio's synchronous API instead (thread-pool server, blocking/future client), for
comparison: the services use ``grpc.aio``. ``--guard on`` serves through the services' own
bootstrap (``services.common.server`` and ``.guard``: guard interceptor, metrics, admission
limits) and ``--guard unlimited`` the same with the limits off: the difference is what they cost.
``--api link`` sends the same requests over one peer link (``services.common.link``: one
long-lived bidirectional stream carrying every request, through the services' bootstrap), the
path DHT nodes and expert clients use between themselves. Reports wall
time per call and CPU microseconds per call on each side (user + system, all threads), so
the per-RPC budgets of the DHT and expert benchmarks can be compared with what gRPC alone
costs here (figures: docs/links.md, "What a request costs"; docs/dht.md and docs/expert.md).

    python benchmarks/rpc_floor.py [--request-bytes 65536] [--concurrency 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from proc import cpu_seconds, free_ports

SERVICE, METHOD = "floor.Echo", "Echo"


def _identity(data: bytes) -> bytes:
    return data


async def serve_link(port: int, reply_bytes: int) -> None:
    """The echo as a peer link's only method, behind the services' bootstrap."""
    import grpc

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from services.common.link import LinkServer
    from services.common.server import start_server
    from services.proto.link_pb2 import LinkBatch

    async def echo(payload: bytes, peer: str) -> bytes:
        return payload[:reply_bytes]

    link = LinkServer({METHOD: echo}, max_pending=1024)

    def register(server: grpc.aio.Server) -> list[str]:
        handler = grpc.stream_stream_rpc_method_handler(
            link.serve,
            request_deserializer=LinkBatch.FromString,
            response_serializer=LinkBatch.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Link": handler}),)
        )
        return [SERVICE]

    from services.common.limits import ServerLimits

    running = await start_server(
        "floor", register, port=port, metrics_port=None, links=[link],
        limits=ServerLimits.unlimited(),  # the floor, not the admission limits
    )  # fmt: skip
    await running.server.wait_for_termination()


async def call_link(
    port: int, request_bytes: int, calls: int, concurrency: int
) -> dict[str, float]:
    import grpc

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from services.common.link import LinkClient
    from services.proto.link_pb2 import LinkBatch

    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    open_call = channel.stream_stream(
        f"/{SERVICE}/Link",
        request_serializer=LinkBatch.SerializeToString,
        response_deserializer=LinkBatch.FromString,
    )
    link = LinkClient(lambda: open_call())
    payload = os.urandom(request_bytes)
    for _ in range(min(200, calls)):
        await link.call(METHOD, payload, 30.0)

    async def worker(n: int) -> None:
        for _ in range(n):
            await link.call(METHOD, payload, 30.0)

    shares = [calls // concurrency + (i < calls % concurrency) for i in range(concurrency)]
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(n) for n in shares))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    await link.close()
    await channel.close()
    return {"wall_s": wall, "client_cpu_s": cpu}


async def serve(port: int, reply_bytes: int, guard: str) -> None:
    import grpc

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request[:reply_bytes]

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                echo, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )
    if guard != "none":  # the services' bootstrap: guard, metrics, admission limits
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from services.common.server import start_server

        def register(server: grpc.aio.Server) -> list[str]:
            server.add_generic_rpc_handlers((handler,))
            return [SERVICE]

        extra: dict[str, Any] = {}
        if guard == "unlimited":
            from services.common.limits import ServerLimits

            extra["limits"] = ServerLimits.unlimited()
        running = await start_server("floor", register, port=port, metrics_port=None, **extra)
        await running.server.wait_for_termination()
        return
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve_sync(port: int, reply_bytes: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    server = grpc.server(
        ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                lambda request, context: request[:reply_bytes],
                request_deserializer=_identity,
                response_serializer=_identity,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def call_sync(port: int, request_bytes: int, calls: int, concurrency: int) -> dict[str, float]:
    """``concurrency`` calls in flight from one thread through the future API."""
    import grpc

    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    echo = channel.unary_unary(
        f"/{SERVICE}/{METHOD}", request_serializer=_identity, response_deserializer=_identity
    )
    payload = os.urandom(request_bytes)
    grpc.channel_ready_future(channel).result(timeout=30)
    for _ in range(min(200, calls)):
        echo(payload)
    started, cpu = time.perf_counter(), time.process_time()
    in_flight: list[Any] = []
    for _ in range(calls):
        if len(in_flight) == concurrency:
            in_flight.pop(0).result()
        in_flight.append(echo.future(payload))
    for future in in_flight:
        future.result()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    channel.close()
    return {"wall_s": wall, "client_cpu_s": cpu}


async def call(port: int, request_bytes: int, calls: int, concurrency: int) -> dict[str, float]:
    import grpc

    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    )
    echo = channel.unary_unary(
        f"/{SERVICE}/{METHOD}", request_serializer=_identity, response_deserializer=_identity
    )
    payload = os.urandom(request_bytes)
    await channel.channel_ready()
    for _ in range(min(200, calls)):  # warm-up: connection, first-call costs
        await echo(payload)

    async def worker(n: int) -> None:
        for _ in range(n):
            await echo(payload)

    shares = [calls // concurrency + (i < calls % concurrency) for i in range(concurrency)]
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(n) for n in shares))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    await channel.close()
    return {"wall_s": wall, "client_cpu_s": cpu}


def _path(args: argparse.Namespace) -> str:
    if args.api == "link":
        return "through the bootstrap (limits off)"
    return "bare" if args.guard == "none" else f"guarded ({args.guard})"


API_NAMES = {
    "aio": "grpc.aio unary call",
    "sync": "grpc (sync API) unary call",
    "link": "request over a peer link",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--request-bytes", type=int, default=65536)
    parser.add_argument("--reply-bytes", type=int, default=None, help="default: request size")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight")
    parser.add_argument("--api", choices=["aio", "sync", "link"], default="aio")
    parser.add_argument(
        "--guard",
        choices=["none", "on", "unlimited"],
        default="none",
        help="serve through the services' common bootstrap (guard interceptor, metrics, "
        "admission limits; 'unlimited': limits off) instead of a bare server (aio only)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    reply_bytes = args.request_bytes if args.reply_bytes is None else args.reply_bytes
    if args.serve is not None:
        if args.api == "sync":
            serve_sync(args.serve, reply_bytes)
        elif args.api == "link":
            asyncio.run(serve_link(args.serve, reply_bytes))
        else:
            asyncio.run(serve(args.serve, reply_bytes, args.guard))
        return 0

    (port,) = free_ports(1)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--reply-bytes", str(reply_bytes),
         "--api", args.api, "--guard", args.guard]
    )  # fmt: skip
    try:
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ready:  # bound: imports are done
            grpc.channel_ready_future(ready).result(timeout=60)
        before = cpu_seconds(server.pid)
        if args.api == "sync":
            result = call_sync(port, args.request_bytes, args.calls, args.concurrency)
        elif args.api == "link":
            result = asyncio.run(call_link(port, args.request_bytes, args.calls, args.concurrency))
        else:
            result = asyncio.run(call(port, args.request_bytes, args.calls, args.concurrency))
        server_cpu = cpu_seconds(server.pid) - before
    finally:
        server.terminate()
        server.wait(timeout=10)
    warm = min(200, args.calls)  # the server's CPU also covers the warm-up calls
    report = {
        "api": args.api,
        "guard": args.guard,
        "request_bytes": args.request_bytes,
        "reply_bytes": reply_bytes,
        "calls": args.calls,
        "concurrency": args.concurrency,
        "wall_us_per_call": round(1e6 * result["wall_s"] / args.calls, 1),
        "client_cpu_us_per_call": round(1e6 * result["client_cpu_s"] / args.calls, 1),
        "server_cpu_us_per_call": round(1e6 * server_cpu / (args.calls + warm), 1),
    }
    report["cpu_us_per_call"] = round(
        report["client_cpu_us_per_call"] + report["server_cpu_us_per_call"], 1
    )
    print(
        f"{_path(args)} "
        f"{API_NAMES[args.api]}, "
        f"{args.request_bytes} B request, {reply_bytes} B reply, "
        f"{args.concurrency} in flight: {report['wall_us_per_call']:.0f} us wall per call; "
        f"CPU per call: client {report['client_cpu_us_per_call']:.0f} us + server "
        f"{report['server_cpu_us_per_call']:.0f} us = {report['cpu_us_per_call']:.0f} us"
    )
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
