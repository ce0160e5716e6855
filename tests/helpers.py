"""Small helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from services.common.healthcheck import wait_serving
from services.common.tls import TLSConfig
from services.dht.config import NodeConfig
from services.dht.server import RunningNode, start_node

ROOT = Path(__file__).resolve().parent.parent
P = ParamSpec("P")
T = TypeVar("T")


def run_async(test: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Run an ``async def`` test in a fresh event loop (``asyncio.run``), fixtures included.

    A decorator rather than pytest-asyncio: every test here wants exactly one loop that ends
    with the test, which is all ``asyncio.run`` does, and it needs no plugin, mode or
    loop-scope settings. ``functools.wraps`` keeps the signature pytest reads fixtures from.
    """

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return asyncio.run(test(*args, **kwargs))

    return run


def metric(owner: Any, name: str, **labels: str) -> float:
    """One sample of a Prometheus registry, or of ``owner.registry`` (a server, a metrics
    object); 0.0 while the labelled child does not exist yet (a counter nobody incremented)."""
    registry = getattr(owner, "registry", owner)
    return registry.get_sample_value(name, labels) or 0.0


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
async def relay_from(target: str, source_ip: str) -> AsyncIterator[str]:
    """A TCP relay on 127.0.0.1 whose connections reach ``target`` from ``source_ip``.

    Linux routes all of 127.0.0.0/8 to loopback, so one host can play callers at several IPs:
    a server sees the relayed connections come from ``source_ip`` (e.g. ``127.0.0.2``), which is
    how tests exercise defences keyed on the caller's address. Yields the relay's address."""
    host, _, port = target.rpartition(":")
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                host, int(port), local_addr=(source_ip, 0)
            )
        except OSError:
            writer.close()
            return
        both = asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        tasks.add(both)  # type: ignore[arg-type]
        both.add_done_callback(tasks.discard)  # type: ignore[arg-type]
        with contextlib.suppress(asyncio.CancelledError):
            await both

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def expert_swarm(*servers: dict[str, Any], dht: bool = True, **swarm_options: Any) -> Iterator[Any]:
    """A trainer ``Swarm`` over real in-process servers on 127.0.0.1: one DHT node (unless
    ``dht=False``) and one ``ExpertServer(ExpertConfig(**server))`` per dict, each declared in
    the DHT before this yields. The swarm carries them as ``swarm.node`` (None without a DHT)
    and ``swarm.servers``; everything is stopped on exit."""
    from prometheus_client import CollectorRegistry

    from services.expert.server import ExpertConfig, ExpertServer
    from services.trainer.metrics import TrainerMetrics
    from services.trainer.swarm import Swarm

    swarm = Swarm(None, metrics=TrainerMetrics(CollectorRegistry()), **swarm_options)
    node = swarm.run(start_node()) if dht else None
    swarm.node, swarm.servers = node, []  # type: ignore[attr-defined]
    try:
        if node is not None:
            swarm.initial_peers = [node.address]
        for config in servers:
            if node is not None:
                config = {"dht_peers": [node.address], "update_period": 30, **config}
            server = swarm.run(ExpertServer(ExpertConfig(**config)).start())
            swarm.servers.append(server)  # type: ignore[attr-defined]
            if node is not None:
                swarm.run(server.declarer.first_success.wait(), timeout=20)
        yield swarm
    finally:
        for server in swarm.servers:  # type: ignore[attr-defined]
            swarm.run(server.stop(0))
        if node is not None:
            swarm.run(node.stop())
        swarm.close()


def peak_rss_bytes(pid: int) -> int:
    """The peak resident set size of process ``pid`` so far (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")
