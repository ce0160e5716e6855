"""Small helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from services.common.healthcheck import wait_serving
from services.common.tls import TLSConfig
from services.dht.config import NodeConfig
from services.dht.server import RunningNode, start_node

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nothing listens on right now (also what tests dial to reach a dead server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(
    predicate: Callable[[], Awaitable[object] | object],
    timeout: float,
    what: str,
    ignore: tuple[type[BaseException], ...] = (),
    every: float = 0.1,
) -> None:
    """Wait until ``predicate()`` (awaited when it is a coroutine) is truthy (exceptions in
    ``ignore`` count as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
        except ignore:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Proc:
    """A service as a real OS process (``python -m <args> --host 127.0.0.1 --port <port>``),
    its stderr in ``<logdir>/<name>.log``."""

    def __init__(self, name: str, args: list[str], logdir: Path, port: int | None = None) -> None:
        self.name, self.port = name, port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = logdir / f"{name}.log"
        with open(self.log, "w") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", *args, "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT,
                stdout=log,
                stderr=log,
                env=ENV,
            )

    def wait_healthy(self, timeout: float = 240.0, tls: TLSConfig | None = None) -> None:
        """Wait until the process answers SERVING; fail at once if it exits.

        The timeout only bounds a hung start: torch's import alone took 25 s at load 40 on the
        2-core CI machine (three benchmarks beside the suite), so 60 s was a flake.
        """
        alive = lambda: self.popen.poll() is None  # noqa: E731
        if wait_serving(self.address, timeout, alive=alive, tls=tls):
            return
        assert self.popen.poll() is None, f"{self.name} exited:\n{self.log.read_text()[-3000:]}"
        raise AssertionError(
            f"{self.name} not healthy in {timeout} s:\n{self.log.read_text()[-3000:]}"
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(
                f"{self.name} still running after {timeout} s:\n{self.log.read_text()[-3000:]}"
            ) from None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


async def make_swarm(
    n: int, rng: random.Random, config: NodeConfig | None = None
) -> list[RunningNode]:
    """Real gRPC DHT nodes in this process, each bootstrapped from up to 3 earlier ones."""
    nodes = [await start_node(config)]
    for i in range(1, n):
        peers = [x.address for x in rng.sample(nodes, min(3, i))]
        nodes.append(await start_node(config, initial_peers=peers))
    await asyncio.wait_for(asyncio.gather(*(x.node.joined.wait() for x in nodes)), 60)
    return nodes


@contextlib.asynccontextmanager
async def serve_expert(
    client_bytes: int = 64 * 1024 * 1024, **config: object
) -> AsyncIterator[tuple[Any, Any]]:
    """An in-process expert server (``ExpertConfig(**config)``) and an ``ExpertClient`` for it.

    The expert modules (and torch) are imported here, not with this file: DHT tests share it."""
    from services.expert.client import ExpertClient
    from services.expert.server import ExpertConfig, ExpertServer

    server = await ExpertServer(ExpertConfig(**config)).start()  # type: ignore[arg-type]
    client = ExpertClient(f"127.0.0.1:{server.port}", max_message_bytes=client_bytes)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(0.5)


@contextlib.asynccontextmanager
async def from_source_ip(target: str, source_ip: str) -> AsyncIterator[str]:
    """A TCP relay on 127.0.0.1 to ``target`` whose outgoing connections come from
    ``source_ip``: Linux routes all of 127.0.0.0/8 to loopback, so a test can play callers
    on distinct addresses (127.0.0.2, ...) that a server keys per IP. Yields the relay's
    ``host:port``, to dial instead of ``target``."""
    host, _, port = target.rpartition(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    tasks: set[asyncio.Task[None]] = set()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            host, int(port), local_addr=(source_ip, 0)
        )
        for a, b in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.ensure_future(pipe(a, b))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
