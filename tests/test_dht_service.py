"""``python -m services.dht`` as real processes: flags/env, health, /metrics, SIGTERM."""

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import until

from services.dht.client import DHTClient
from services.dht.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent


class Service:
    """A DHT node process; its JSON log lines are read on a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "services.dht", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--log-format", "json", *args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        started = self.wait_for("dht node started")
        self.port, self.metrics_port = started["port"], started["metrics_port"]
        self.address = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)

    def wait_for(self, message: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"exited with {self.proc.returncode}"
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("msg") == message:
                return record
        raise TimeoutError(message)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=5).read().decode()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


async def health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="dmoe.DHT"), timeout=5)
        return reply.status


async def wait_serving(address: str, timeout: float = 240.0) -> None:
    async def serving() -> bool:
        return await health(address) == health_pb2.HealthCheckResponse.SERVING

    await until(serving, timeout, f"{address} SERVING")


def test_service_processes_join_serve_metrics_and_stop_on_sigterm() -> None:
    first = Service()
    second = None
    try:
        asyncio.run(wait_serving(first.address))  # no initial peers: serving at once
        # the second one joins through a DNS name given in the environment
        second = Service(env={"DMOE_INITIAL_PEERS": f"localhost:{first.port}", "DMOE_K": "8"})
        second.wait_for("joined the DHT")

        async def use() -> None:
            await wait_serving(second.address)
            async with DHTClient([second.address]) as client:
                assert await client.put([("svc.key", "sub", b"v", time.time() + 30)]) == [True]
            async with DHTClient([first.address]) as client:
                found = await client.get(["svc.key"], latest=True)
                assert found["svc.key"][b"sub"][0].value == b"v"

        asyncio.run(use())
        text = second.metrics()
        for name in (*METRIC_NAMES, "dmoe_dht_rpc_requests_total", "dmoe_build_info"):
            assert name in text, name
        assert "dmoe_dht_joined 1.0" in text
        assert "dmoe_dht_routing_table_peers 1.0" in text
        assert 'dmoe_dht_outgoing_rpcs_total{code="OK",method="Find"}' in text
        assert 'dmoe_dht_rpc_requests_total{code="OK",method="Put"}' in text
    finally:
        codes = [s.terminate() for s in (second, first) if s is not None]
    assert codes == [0] * len(codes)


def test_help_and_bad_flags() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "services.dht", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0
    for flag in ("--initial-peers", "--k", "--alpha", "--num-replicas", "--depth-modulo",
                 "--max-value-bytes", "--max-records", "DMOE_INITIAL_PEERS"):  # fmt: skip
        assert flag in run.stdout, flag
    bad = subprocess.run(
        [sys.executable, "-m", "services.dht", "--initial-peers", "no-port"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "host:port" in bad.stderr


def test_dht_never_imports_torch() -> None:
    code = (
        "import sys, services.dht.__main__, services.dht.client, services.dht.server; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
