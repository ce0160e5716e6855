"""Mutual TLS on every gRPC port, with real processes on 127.0.0.1.

A swarm made with ``deploy/tls/make_certs.py``: two DHT nodes, an expert server and a trainer,
every one started with ``--tls-cert/--tls-key/--tls-ca --tls-server-name dmoe``. Clients
without a certificate, with a certificate of another CA, in plaintext or verifying the wrong
name are refused at the handshake (UNAVAILABLE) on every port; a client with a swarm
certificate is served, and the services reach each other (DHT join, declarations, trainer
steps) over mutual TLS only.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ENV, ROOT, Proc, run_async

from services.common.channels import sync_channel
from services.common.errors import CallError
from services.common.server import start_server
from services.common.tls import TLSConfig, TLSError
from services.dht.client import DHTClient
from services.expert.client import ExpertClient
from services.proto import dht_pb2, dht_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.trainer.swarm import Swarm

H = 8
NAMES = ["dht0", "dht1", "expert", "trainer", "client"]


def make_certs(out: Path, *names: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "deploy/tls/make_certs.py", str(out), "--names", *names]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path]:
    """The swarm's certificates, and a rogue CA's ``client`` certificate."""
    base = tmp_path_factory.mktemp("certs")
    make_certs(base / "swarm", *NAMES)
    make_certs(base / "rogue", "client")
    return base / "swarm", base / "rogue"


def member(folder: Path, name: str, **kw: str) -> TLSConfig:
    return TLSConfig(str(folder / f"{name}.crt"), str(folder / f"{name}.key"),
                     str(folder / "ca.crt"), **kw)  # fmt: skip


def tls_flags(folder: Path, name: str) -> list[str]:
    return [
        "--tls-cert", str(folder / f"{name}.crt"), "--tls-key", str(folder / f"{name}.key"),
        "--tls-ca", str(folder / "ca.crt"), "--tls-server-name", "dmoe",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def swarm(certs, tmp_path_factory):
    """Two DHT nodes, an expert server (hosting ffn.0, ffn.1) and a trainer, all mTLS only."""
    folder, _rogue = certs
    logdir = tmp_path_factory.mktemp("logs")
    client = member(folder, "client", server_name="dmoe")
    procs: dict[str, Proc] = {}
    quick = ["--metrics-port", "-1", "--shutdown-grace", "0.5"]
    try:
        procs["dht0"] = Proc("dht0", ["services.dht", *quick, *tls_flags(folder, "dht0")], logdir)
        dht0 = procs["dht0"].address
        procs["dht1"] = Proc(
            "dht1",
            ["services.dht", *quick, "--initial-peers", dht0, *tls_flags(folder, "dht1")],
            logdir,
        )
        peers = f"{dht0},{procs['dht1'].address}"
        procs["expert"] = Proc("expert", [
            "services.expert", *quick, "--experts", "ffn.[0:2]", "--hidden-dim", str(H),
            "--seed", "0",
            "--dht-peers", peers, "--update-period", "2", "--compute-threads", "1",
            "--torch-threads", "1", *tls_flags(folder, "expert"),
        ], logdir)  # fmt: skip
        procs["trainer"] = Proc("trainer", [
            "services.trainer", *quick, "--initial-peers", peers, "--uid-prefix", "ffn",
            "--grid", "2",
            "--hidden-dim", str(H), "--k-best", "2", "--steps", "100000", "--eval-every", "0",
            "--batch-size", "16", "--forward-timeout", "3", "--backward-timeout", "3",
            "--failure-pause", "0.2", *tls_flags(folder, "trainer"),
        ], logdir)  # fmt: skip
        for proc in procs.values():
            proc.wait_healthy(tls=client)
        yield procs, client
    finally:
        for proc in reversed(procs.values()):
            proc.stop()


def health(address: str, tls: TLSConfig | None) -> int:
    with sync_channel(address, tls=tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status


def refused(address: str, tls: TLSConfig | None) -> bool:
    try:
        health(address, tls)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


# ---- certificates and configuration -----------------------------------------------------------


def test_make_certs_makes_a_ca_and_dual_use_certificates_and_keeps_them(tmp_path) -> None:
    out = tmp_path / "c"
    make_certs(out, "node-a", "10.1.2.3")
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    for name in ("node-a", "10.1.2.3"):
        cert = x509.load_pem_x509_certificate((out / f"{name}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        assert {"dmoe", "localhost"} <= set(dns) and {"127.0.0.1", "::1"} <= set(ips)
        assert name in dns + ips
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = make_certs(out, "node-a", "10.1.2.3", "node-b")
    assert "made node-b" in again.stdout
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {k: after[k] for k in before} == before  # CA and existing pairs kept as they were
    TLSConfig(str(out / "node-b.crt"), str(out / "node-b.key"), str(out / "ca.crt"))


def test_bad_tls_settings_fail_at_start(certs, tmp_path) -> None:
    folder, rogue = certs
    cert, key, ca = (str(folder / n) for n in ("dht0.crt", "dht0.key", "ca.crt"))
    not_pem = tmp_path / "junk.pem"
    not_pem.write_text("hello\n")
    encrypted = tmp_path / "encrypted.key"
    pem = serialization.load_pem_private_key((folder / "dht0.key").read_bytes(), None)
    assert isinstance(pem, ec.EllipticCurvePrivateKey)
    encrypted.write_bytes(pem.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))  # fmt: skip
    cases = {
        "cannot read": dict(cert=str(tmp_path / "missing.crt"), key=key),
        "not a PEM certificate": dict(cert=str(not_pem), key=key),
        "not a PEM private key": dict(cert=cert, key=str(not_pem)),
        "encrypted": dict(cert=cert, key=str(encrypted)),
        "not a pair": dict(cert=cert, key=str(rogue / "client.key")),
        "--tls-ca": dict(cert=cert, key=key, ca=str(not_pem)),
        "together": dict(cert=cert),
        "not a host name": dict(ca=ca, server_name="a b"),
    }
    for message, kwargs in cases.items():
        with pytest.raises(TLSError, match=message):
            TLSConfig(**kwargs)

    def run(service: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", service, "--initial-peers", "127.0.0.1:1", *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=ENV,
                              timeout=60)  # fmt: skip

    missing = run("services.dht", "--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", key)
    assert missing.returncode == 2 and "nope.crt: cannot read" in missing.stderr
    ca_only = run("services.trainer", "--tls-ca", ca)
    assert ca_only.returncode == 2 and "needs --tls-cert and --tls-key" in ca_only.stderr
    from_env = subprocess.run(
        [sys.executable, "-m", "services.dht"], cwd=ROOT, capture_output=True, text=True,
        env={**ENV, "DMOE_TLS_CERT": cert, "DMOE_TLS_KEY": str(not_pem)}, timeout=60,
    )  # fmt: skip
    assert from_env.returncode == 2 and "not a PEM private key" in from_env.stderr


@run_async
async def test_server_only_tls_without_ca_accepts_clients_without_certificates(certs) -> None:
    folder, _rogue = certs
    tls = TLSConfig(str(folder / "dht0.crt"), str(folder / "dht0.key"))
    assert not tls.mutual

    running = await start_server("test", lambda server: [], metrics_port=None, tls=tls)
    await running.set_serving(True)
    address = f"127.0.0.1:{running.port}"
    try:
        anonymous = TLSConfig(ca=str(folder / "ca.crt"))
        status = await asyncio.to_thread(health, address, anonymous)
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert await asyncio.to_thread(refused, address, None)
    finally:
        await running.stop(0)


# ---- the mTLS swarm ----------------------------------------------------------------------------


def test_every_port_refuses_clients_without_a_swarm_certificate(swarm, certs) -> None:
    procs, client = swarm
    folder, rogue = certs
    ca = str(folder / "ca.crt")
    clients = {
        "plaintext": None,
        "no client certificate": TLSConfig(ca=ca, server_name="dmoe"),
        "certificate of another CA": TLSConfig(
            str(rogue / "client.crt"), str(rogue / "client.key"), ca, server_name="dmoe"
        ),
        "server not trusted": member(rogue, "client", server_name="dmoe"),
        "wrong server name": member(folder, "client", server_name="someone-else"),
    }
    for proc in procs.values():
        for what, tls in clients.items():
            assert refused(proc.address, tls), f"{proc.name} served a client with {what}"
        # still up and serving members afterwards
        assert health(proc.address, client) == health_pb2.HealthCheckResponse.SERVING
        # the dialled host (127.0.0.1, in every certificate) verifies without an override too
        assert health(proc.address, member(folder, "client")) == (
            health_pb2.HealthCheckResponse.SERVING
        )
    if "GRPC_VERBOSITY" not in os.environ:  # refused handshakes do not write a line each
        for proc in procs.values():
            assert "Handshake failed" not in proc.log.read_text(), proc.name


@run_async
async def test_dht_nodes_joined_each_other_and_serve_members_over_mtls(swarm) -> None:
    procs, client = swarm
    dht0, dht1 = procs["dht0"].address, procs["dht1"].address
    for address, other in ((dht0, dht1), (dht1, dht0)):
        with sync_channel(address, tls=client) as channel:
            status = dht_pb2_grpc.DHTStub(channel).NodeStatus(
                dht_pb2.NodeStatusRequest(), timeout=10
            )
        assert status.joined and status.routing_table_size >= 1
        assert other in {peer.address for peer in status.peers}

    async with DHTClient([dht1], tls=client) as one, DHTClient([dht0], tls=client) as zero:
        assert await one.put([("tls-key", None, b"secret value", time.time() + 60)]) == [True]
        found = await zero.get(["tls-key"])
        assert found["tls-key"] is not None and found["tls-key"].value == b"secret value"
        # the expert declared itself through its own mTLS DHT client
        declared = await zero.get(["ffn."])
        assert set(declared["ffn."]) == {b"0", b"1"}
    async with DHTClient([dht0], timeout=2.0) as plaintext:
        with pytest.raises(ConnectionError):
            await plaintext.get(["tls-key"])


def test_expert_forward_over_mtls_and_the_trainer_swarm(swarm) -> None:
    procs, client = swarm
    expert = procs["expert"].address
    x = torch.randn(3, H)

    async def direct() -> None:
        async with ExpertClient(expert, tls=client) as member_client:
            (out,) = await member_client.forward("ffn.0", [x], timeout=10)
            assert out.shape == (3, H) and torch.isfinite(out).all()
        async with ExpertClient(expert) as plaintext:
            with pytest.raises(CallError) as info:
                await plaintext.forward("ffn.0", [x], timeout=10)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(direct())
    with Swarm([procs["dht0"].address], tls=client, cache_ttl=0.0) as trainer_swarm:
        children = trainer_swarm.run(trainer_swarm.children(["ffn."]), timeout=30)
        assert children["ffn."] == {0: [expert], 1: [expert]}
        (out,) = trainer_swarm.run(trainer_swarm.forward("ffn.1", expert, [x], 10.0), timeout=30)
        assert out.shape == (3, H)


def test_trainer_trains_over_mtls(swarm) -> None:
    procs, client = swarm
    trainer = procs["trainer"]
    deadline = time.monotonic() + 120
    with sync_channel(trainer.address, tls=client) as channel:
        stub = trainer_pb2_grpc.TrainerStub(channel)
        while True:
            reply = stub.Status(trainer_pb2.StatusRequest(), timeout=10)
            if reply.step >= 3:
                break
            assert trainer.popen.poll() is None, trainer.log.read_text()[-3000:]
            assert time.monotonic() < deadline, trainer.log.read_text()[-3000:]
            time.sleep(0.2)
    assert set(reply.experts_in_use) <= {"ffn.0", "ffn.1"} and reply.experts_in_use


def test_healthcheck_cli_with_tls_flags_and_environment(swarm, certs) -> None:
    procs, _client = swarm
    folder, _rogue = certs
    address = procs["dht1"].address

    def check(*args: str, env: dict[str, str] | None = None) -> int:
        command = [sys.executable, "-m", "services.common.healthcheck", "--address", address]
        result = subprocess.run([*command, *args], cwd=ROOT, capture_output=True, timeout=60,
                                env={**ENV, **(env or {})})  # fmt: skip
        return result.returncode

    cert, key, ca = (str(folder / n) for n in ("client.crt", "client.key", "ca.crt"))
    assert check("--tls-cert", cert, "--tls-key", key, "--tls-ca", ca) == 0
    as_in_a_container = {
        "DMOE_TLS_CERT": cert, "DMOE_TLS_KEY": key, "DMOE_TLS_CA": ca,
        "DMOE_TLS_SERVER_NAME": "dmoe",
    }  # fmt: skip
    assert check(env=as_in_a_container) == 0
    assert check() == 1  # plaintext
    assert check("--tls-ca", ca) == 1  # no client certificate
