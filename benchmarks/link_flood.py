"""Link flood probe (issue 19, item 1): ``python benchmarks/link_flood.py [--json]``.

Starts one DHT node (``python -m services.dht``) and, while a client polls its health every
10 ms, sends it ``--messages`` ``LinkBatch`` messages of ``--frames`` tiny frames naming no
method on one ``DHTPeer/Link`` stream, from 127.0.0.2 (a TCP relay binds its outgoing socket
there, so the flood has its own IP, as an attacker would). Reports the slowest health check and
the node's peak RSS growth (``VmHWM``). Run it from two checkouts to compare code versions.
Prints a human summary; with ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proc import free_ports, stop  # noqa: E402

from services.common.channels import channel_options  # noqa: E402
from services.common.healthcheck import wait_serving  # noqa: E402
from services.proto.link_pb2 import LinkBatch, LinkFrame  # noqa: E402


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def relay(target_port: int, source_ip: str) -> asyncio.Server:
    """A TCP relay on 127.0.0.1 whose connections reach the node from ``source_ip``."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", target_port, local_addr=(source_ip, 0)
        )
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def flood(port: int, pid: int, frames: int, messages: int) -> dict[str, float]:
    frame = LinkFrame(id=1).SerializeToString()
    message = (b"\x0a" + bytes([len(frame)]) + frame) * frames  # a LinkBatch, built as bytes
    before = peak_rss(pid)
    worst, stopping = 0.0, False
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def poll() -> None:
            nonlocal worst
            while not stopping:
                started = time.perf_counter()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=120)
                worst = max(worst, time.perf_counter() - started)
                await asyncio.sleep(0.01)

        poller = asyncio.ensure_future(poll())
        server = await relay(port, "127.0.0.2")
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        options = channel_options(64 << 20)
        async with grpc.aio.insecure_channel(address, options=options) as attacker:
            call = attacker.stream_stream(
                "/dmoe.DHTPeer/Link",
                request_serializer=lambda data: data,
                response_deserializer=LinkBatch.FromString,
            )()
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                for _ in range(messages):
                    await call.write(message)
            await asyncio.sleep(10)  # let the node work through what it received
            call.cancel()
        server.close()
        stopping = True
        await poller
    return {
        "worst_health_check_s": worst,
        "peak_rss_growth_mib": (peak_rss(pid) - before) / (1 << 20),
        "message_bytes": len(message),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_500_000)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    (port,) = free_ports(1)
    folder = tempfile.mkdtemp(prefix="dmoe-link-flood-")
    cmd = [sys.executable, "-m", "services.dht", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", "-1", "--identity-file", f"{folder}/dht.key"]  # fmt: skip
    log = open(Path(folder) / "dht.log", "w")  # noqa: SIM115 - closed below
    node = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)
    try:
        if not wait_serving(f"127.0.0.1:{port}", 120, alive=lambda: node.poll() is None):
            raise SystemExit(f"the DHT node did not start; see {folder}/dht.log")
        result = asyncio.run(flood(port, node.pid, args.frames, args.messages))
    finally:
        stop([node])
        log.close()
    result["load_average_1m"] = os.getloadavg()[0]
    print(
        f"{args.messages} x {args.frames:,} frames ({result['message_bytes'] / 1e6:.1f} MB each): "
        f"slowest health check {result['worst_health_check_s'] * 1000:.0f} ms, peak RSS growth "
        f"{result['peak_rss_growth_mib']:.0f} MiB (load {result['load_average_1m']:.1f})"
    )
    if args.json:
        print(json.dumps({"frames": args.frames, "messages": args.messages, **result}))


if __name__ == "__main__":
    main()
