"""Experts appear in a real DHT (every prefix beam search needs), reappear after a DHT outage,
vanish after shutdown, and ``--num-experts`` skips uids other servers already declared."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import free_port, run_async, until
from prometheus_client import CollectorRegistry

from services.common.identity import Identity
from services.dht.client import DHTClient, DHTUnavailable
from services.dht.server import start_node
from services.expert.declare import Declarer
from services.expert.metrics import ExpertMetrics
from services.expert.server import ExpertConfig, ExpertServer

ROOT = Path(__file__).resolve().parent.parent


def _start_dht(port: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "services.dht", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", "-1", "--log-level", "warning", "--shutdown-grace", "0.5",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT)


async def _until(predicate, timeout: float, what: str) -> None:
    await until(predicate, timeout, what, ignore=(DHTUnavailable,), every=0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    finally:
        proc.kill()


def test_declared_after_start_redeclared_after_outage_gone_after_stop() -> None:
    port = free_port()
    dht_proc = _start_dht(port)
    peer = f"127.0.0.1:{port}"

    async def scenario() -> None:
        nonlocal dht_proc
        dht = DHTClient([peer], timeout=2.0)
        server = None
        try:
            await _until(lambda: dht.get(["probe"]), 60, "the DHT to start")
            config = ExpertConfig(
                experts=["ffn.[0:2].[3:5]"], hidden_dim=8, dht_peers=[peer], update_period=1.0
            )
            server = await ExpertServer(config).start()
            address = server.address.encode()
            keys = ["ffn.0.3", "ffn.1.4", "ffn.0.", "ffn.1.", "ffn."]

            async def declared() -> bool:
                found = await dht.get(keys)
                return all(found[k] is not None for k in keys)

            await _until(declared, 20, "the declaration")
            found = await dht.get(keys)
            owner = server.identity.public_key
            (entry,) = found["ffn.0.3"][b""]  # owned by the server: its own slot of the key
            assert entry.value == address and entry.owner == owner
            assert set(found["ffn.0."]) == {b"3", b"4"}
            assert [(e.value, e.owner) for e in found["ffn.1."][b"4"]] == [(address, owner)]
            assert set(found["ffn."]) == {b"0", b"1"}
            expiration = entry.expiration
            assert time.time() < expiration <= time.time() + 2 * config.update_period + 1
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest()
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

            # outage: the DHT restarts empty on the same port; the server declares again
            _stop(dht_proc)

            async def failed() -> bool:
                value = server.registry.get_sample_value(
                    "dmoe_expert_dht_declaration_failures_total", {"reason": "unavailable"}
                )
                return bool(value)

            await _until(failed, 20, "a failed declaration")
            dht_proc = _start_dht(port)
            await _until(declared, 40, "the declaration after the outage")

            # shutdown: nobody renews the entries, so they expire within 2 periods
            await server.stop(0.5)
            server = None

            async def gone() -> bool:
                found = await dht.get(keys)
                return all(found[k] is None for k in keys)

            await _until(gone, 2 * config.update_period + 5, "the experts to vanish")
        finally:
            if server is not None:
                await server.stop(0.5)
            await dht.close()

    try:
        asyncio.run(scenario())
    finally:
        _stop(dht_proc)


def test_num_experts_skips_uids_declared_by_others() -> None:
    port = free_port()
    dht_proc = _start_dht(port)
    peer = f"127.0.0.1:{port}"

    async def scenario() -> None:
        dht = DHTClient([peer], timeout=2.0)
        server = None
        try:
            await _until(lambda: dht.get(["probe"]), 60, "the DHT to start")
            taken = ["smp.0", "smp.1", "smp.3", "smp.4"]
            # taken: owned by another server; unowned values (anyone can write them) are not
            other = DHTClient([peer], timeout=2.0, identity=Identity.generate())
            items = [(u, "", b"10.0.0.9:1", time.time() + 60) for u in taken]
            assert all(await other.put(items, owned=True))
            assert all(await other.put([("smp.2", None, b"10.0.0.9:1", time.time() + 60)]))
            await other.close()
            config = ExpertConfig(
                experts=["smp.[0:5]"], num_experts=1, hidden_dim=8, dht_peers=[peer],
                update_period=5.0,
            )  # fmt: skip
            server = await ExpertServer(config).start()
            assert list(server.backends) == ["smp.2"]
        finally:
            if server is not None:
                await server.stop(0.5)
            await dht.close()

    try:
        asyncio.run(scenario())
    finally:
        _stop(dht_proc)


@run_async
async def test_a_renewal_is_accepted_when_the_client_clock_goes_back() -> None:
    """The expert's declarations never carry an earlier expiration than the last one, so a
    DHT time correction (or a round overtaking another) cannot get a renewal refused."""

    node = await start_node()
    host = [time.time()]
    try:
        async with DHTClient([node.address], identity=Identity.generate()) as client:
            client.clock.source = lambda: host[0]
            declarer = Declarer(
                client, ["ffn.0.0"], "127.0.0.1:5", 30.0, ExpertMetrics(CollectorRegistry())
            )
            assert await declarer.declare_once()
            first = (await client.get(["ffn.0."]))["ffn.0."][b"0"][0].expiration
            host[0] -= 5.0  # DHT time moved back five seconds
            assert await declarer.declare_once()
            rounds = await asyncio.gather(*(declarer.declare_once() for _ in range(4)))
            assert rounds == [True] * 4  # concurrent rounds take turns
            found = await client.get(["ffn.0."])
            assert found["ffn.0."][b"0"][0].expiration >= first
    finally:
        await node.stop(0)
