"""Fuzz every RPC of every service, found through server reflection, against real processes.

A DHT node, an expert server (two tiny ``ffn`` experts, no DHT) and a trainer (its DHT is that
node; it finds no experts, so it keeps skipping steps and serving ``Status``) run as separate
processes with their default limits. Every method each one lists, ``dmoe.*``, health and
reflection alike, gets random bytes, random structured messages and mutations
(tests/grpc_fuzz.py). Every answer must be a documented status (never UNKNOWN or INTERNAL);
afterwards each process is alive, SERVING, has logged no traceback and has not grown by more
than ``RSS_GROWTH``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch
from grpc_fuzz import Fuzzer, Method, discover
from helpers import Proc, free_port

from services.common.healthcheck import wait_serving
from services.common.tensor_codec import encode
from services.proto import expert_pb2

SEED = 20261202
RSS_GROWTH = 300 * 1024 * 1024
UIDS = ["ffn.0", "ffn.1"]
H = 8


def _expert_seeds() -> dict[str, list[list[bytes]]]:
    """Valid requests to mutate (random ones almost never carry a well-formed tensor)."""
    x, g = torch.randn(3, H), torch.randn(3, H)
    forward = expert_pb2.ExpertRequest(uid=UIDS[0], tensors=[encode(x)]).SerializeToString()
    backward = expert_pb2.ExpertRequest(uid=UIDS[1], tensors=[encode(x), encode(g)])
    seeds = {"Forward": forward, "Backward": backward.SerializeToString()}

    def streamed(data: bytes) -> list[bytes]:
        half = len(data) // 2
        first = expert_pb2.Chunk(data=data[:half], total_bytes=len(data))
        return [first.SerializeToString(), expert_pb2.Chunk(data=data[half:]).SerializeToString()]

    return {
        **{f"/dmoe.Expert/{name}": [[data]] for name, data in seeds.items()},
        **{f"/dmoe.Expert/{name}Stream": [streamed(data)] for name, data in seeds.items()},
        "/dmoe.Expert/Info": [[expert_pb2.InfoRequest(uid=UIDS[0]).SerializeToString()]],
    }


def _rss(proc: Proc) -> int:
    for line in Path(f"/proc/{proc.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {proc.name}")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Proc]:
    logdir = tmp_path_factory.mktemp("fuzz")
    dht = Proc("dht", ["services.dht", "--metrics-port", "-1"], logdir, free_port())
    expert_args = [
        "services.expert", "--no-dht", "--experts", "ffn.[0:2]", "--hidden-dim", str(H),
        "--seed", "0", "--max-batch-size", "64", "--metrics-port", "-1",
        "--compute-threads", "1", "--torch-threads", "1",
    ]  # fmt: skip
    procs = {"dht": dht, "expert": Proc("expert", expert_args, logdir, free_port())}
    try:
        dht.wait_healthy()
        trainer_args = [
            "services.trainer", "--initial-peers", dht.address, "--hidden-dim", "8",
            "--grid", "2x2", "--batch-size", "8", "--eval-every", "0", "--failure-pause", "1",
            "--metrics-port", "-1",
        ]  # fmt: skip
        procs["trainer"] = Proc("trainer", trainer_args, logdir, free_port())
        for proc in procs.values():
            proc.wait_healthy()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


async def _fuzz_all(
    services: dict[str, Proc], seed: int, seconds_per_method: float
) -> dict[str, tuple[list[Method], Fuzzer]]:
    """Fuzz every service at once (each its methods one after the other)."""
    dictionaries = {"dht": [p.address for p in services.values()], "expert": list(UIDS)}
    seeds = {"expert": _expert_seeds()}

    async def one(name: str) -> tuple[list[Method], Fuzzer]:
        async with grpc.aio.insecure_channel(services[name].address) as channel:
            methods = await discover(channel)
            fuzzer = Fuzzer(channel, seed, dictionaries.get(name, []), seeds.get(name, {}))
            fuzzer.seconds_per_method = seconds_per_method
            await fuzzer.run(methods)
        return methods, fuzzer

    return dict(zip(services, await asyncio.gather(*map(one, services)), strict=True))


def test_every_rpc_of_every_service_survives_fuzzing(services: dict[str, Proc]) -> None:
    # a short first round takes each process to its allocator's working size, so the growth
    # measured over the main round is what the fuzzing leaves behind (a leak), not warm-up
    warm_up = asyncio.run(_fuzz_all(services, SEED + 1, seconds_per_method=0.5))
    before = {name: _rss(proc) for name, proc in services.items()}
    results = asyncio.run(_fuzz_all(services, SEED, seconds_per_method=2.5))
    report = []
    for name, (methods, fuzzer) in results.items():
        proc = services[name]
        paths = {m.path for m in methods}
        assert "/grpc.health.v1.Health/Check" in paths and len(paths) > 4, paths
        assert any(p.startswith("/dmoe.") for p in paths), paths
        report += [f"{name} {path}: {codes}" for path, codes in fuzzer.codes.items()]
        report += [f"  {key}: {text[:150]}" for key, text in fuzzer.examples.items()]
        findings = warm_up[name][1].findings + fuzzer.findings
        assert not findings, "\n".join(map(str, findings[:20]))
        assert proc.popen.poll() is None, f"{name} exited:\n{proc.log.read_text()[-3000:]}"
        assert wait_serving(proc.address, 30), f"{name} is not SERVING after the fuzzing"
        grown = _rss(proc) - before[name]
        report.append(f"{name}: RSS {before[name] >> 20} MiB -> +{grown >> 20} MiB")
        assert grown < RSS_GROWTH, f"{name} grew by {grown >> 20} MiB"
        log = proc.log.read_text()
        assert "Traceback" not in log, f"{name} logged a traceback:\n{log[-5000:]}"
    print("\n".join(report))
