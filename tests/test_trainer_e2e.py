"""End to end with real processes: a DHT node, expert servers and trainers on 127.0.0.1.

Kept small so the file runs in about a minute on two cores: 32-wide experts on 4x4 grids,
digits batches of 64, a few hundred steps.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from helpers import Proc, free_port

from services.proto import trainer_pb2, trainer_pb2_grpc

H = 32


def start_dht(logdir: Path) -> Proc:
    return Proc("dht", ["services.dht", "--metrics-port", "-1"], logdir, free_port())


def start_expert(name: str, patterns: str, dht: Proc, logdir: Path) -> Proc:
    args = [
        "services.expert", "--experts", patterns, "--hidden-dim", str(H), "--dht-peers",
        dht.address, "--update-period", "2", "--seed", "0", "--metrics-port", "-1",
        "--compute-threads", "1", "--torch-threads", "1", "--lr", "0.002",
    ]  # fmt: skip
    return Proc(name, args, logdir, free_port())


def start_trainer(name: str, dht: Proc, logdir: Path, *extra: str, metrics_port: int = -1) -> Proc:
    args = [
        "services.trainer", "--initial-peers", dht.address, "--grid", "4x4", "--hidden-dim",
        str(H), "--k-best", "4", "--lr", "0.003", "--eval-every", "50", "--log-format", "json",
        "--metrics-port", str(metrics_port), "--history-file", str(logdir / f"{name}.json"),
        "--forward-timeout", "3", "--backward-timeout", "3", "--seed", "0", *extra,
    ]  # fmt: skip
    return Proc(name, args, logdir, free_port())


def history(logdir: Path, name: str) -> list[dict]:
    return json.loads((logdir / f"{name}.json").read_text())["history"]


def status(proc: Proc) -> trainer_pb2.StatusResponse:
    with grpc.insecure_channel(proc.address) as channel:
        return trainer_pb2_grpc.TrainerStub(channel).Status(trainer_pb2.StatusRequest(), timeout=5)


def wait_for_step(proc: Proc, step: int, timeout: float) -> trainer_pb2.StatusResponse:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, proc.log.read_text()[-3000:]
        try:
            reply = status(proc)
            if reply.step >= step:
                return reply
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{proc.name} did not reach step {step}:\n{proc.log.read_text()[-3000:]}")


def grids(i: int) -> str:
    return f"ffn.[0:4].[{2 * i}:{2 * i + 2}],two.[0:4].[{2 * i}:{2 * i + 2}]"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """A DHT node and two expert servers; grids ``ffn`` (shared), ``two`` and ``kill`` (fresh)."""
    logdir = tmp_path_factory.mktemp("swarm")
    dht = start_dht(logdir)
    procs = [dht]
    try:
        dht.wait_healthy()
        experts = [
            start_expert(f"expert{i}", f"{grids(i)},kill.[0:4].{i}", dht, logdir) for i in range(2)
        ]
        procs += experts
        for proc in experts:
            proc.wait_healthy()
        yield dht, experts, logdir
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_trainer_reaches_090_on_digits(swarm) -> None:
    dht, _experts, logdir = swarm
    metrics_port = free_port()
    trainer = start_trainer("t1", dht, logdir, "--steps", "120", metrics_port=metrics_port)
    try:
        reply = wait_for_step(trainer, 5, 90)
        assert reply.dataset == "digits" and reply.model == "mlp"
        assert reply.samples_seen >= 5 * 64 and reply.experts_in_use
        assert all(uid.startswith("ffn.") for uid in reply.experts_in_use)
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert "dmoe_trainer_steps_total" in text
        assert 'dmoe_trainer_expert_call_duration_seconds_count{method="forward"}' in text
        assert "dmoe_trainer_beam_search_duration_seconds_count" in text
        assert trainer.wait(150) == 0
    finally:
        trainer.stop()
    curve = history(logdir, "t1")
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 120
    assert curve[-1]["test_accuracy"] >= 0.90, curve


def test_sigterm_checkpoints_and_resume_continues(swarm) -> None:
    dht, _experts, logdir = swarm
    ckpt = logdir / "ckpt"
    trainer = start_trainer(
        "t2",
        dht,
        logdir,
        "--steps",
        "0",
        "--checkpoint-dir",
        str(ckpt),
        "--checkpoint-every",
        "1000",
    )
    try:
        wait_for_step(trainer, 20, 90)
        trainer.popen.send_signal(signal.SIGTERM)
        assert trainer.wait(30) == 0
    finally:
        trainer.stop()
    assert (ckpt / "trainer.pt").exists()
    lines = [
        json.loads(line) for line in trainer.log.read_text().splitlines() if line.startswith("{")
    ]
    saved = [line["step"] for line in lines if line["msg"] == "checkpoint saved"][-1]
    assert saved >= 20
    resumed = start_trainer(
        "t3", dht, logdir, "--steps", str(saved + 10), "--checkpoint-dir", str(ckpt)
    )
    try:
        assert resumed.wait(90) == 0
    finally:
        resumed.stop()
    lines = [
        json.loads(line) for line in resumed.log.read_text().splitlines() if line.startswith("{")
    ]
    assert [line["step"] for line in lines if line["msg"] == "resumed from checkpoint"] == [saved]
    assert [line["step"] for line in lines if line["msg"] == "training finished"] == [saved + 10]


def test_two_trainers_train_the_same_experts(swarm) -> None:
    dht, _experts, logdir = swarm
    # the experts are what they share: each trains its own layers from its own init (with
    # averaging on, the later one would download the other's model and begin near the accuracy
    # checked below)
    common = ("--steps", "80", "--uid-prefix", "two", "--average", "false")
    trainers = [start_trainer(f"pair{i}", dht, logdir, *common, "--seed", str(i)) for i in range(2)]
    try:
        for trainer in trainers:
            assert trainer.wait(180) == 0
    finally:
        for trainer in trainers:
            trainer.stop()
    for i in range(2):
        curve = history(logdir, f"pair{i}")
        assert curve[-1]["step"] == 80
        assert curve[-1]["test_accuracy"] >= curve[0]["test_accuracy"] + 0.5, curve
        assert curve[-1]["test_loss"] < curve[0]["test_loss"] / 2, curve


def test_killing_a_quarter_of_the_expert_servers(swarm) -> None:
    """Four servers host the ``kill`` grid (two from the fixture, two more here); one dies.

    The trainer runs until stopped (``--steps 0``), so no check below can race its exit; every
    window is counted in steps, not seconds, so a fast machine checks as many steps as a slow one.
    """
    dht, _experts, logdir = swarm
    extra = [start_expert(f"expert{i}", f"kill.[0:4].{i}", dht, logdir) for i in (2, 3)]
    try:
        for proc in extra:
            proc.wait_healthy()
        # a failing expert is left alone for 60 s: longer than the window checked below
        trainer = start_trainer(
            "killer", dht, logdir, "--steps", "0", "--uid-prefix", "kill", "--backoff-base", "60"
        )
        try:
            before = wait_for_step(trainer, 40, 120)
            assert any(uid.endswith(".2") for uid in before.experts_in_use)  # the victim serves
            extra[0].popen.kill()  # SIGKILL: no goodbye, its declarations linger until they expire
            extra[0].popen.wait()
            after_kill = status(trainer).step
            settled = wait_for_step(trainer, after_kill + 10, 120).step
            # from then on the victim's experts are not even called (back-off, then expiry)
            called: set[str] = set()
            seen: set[int] = set()
            reply = status(trainer)
            while reply.step < settled + 20:
                seen.add(reply.step)
                called |= {u for u in reply.experts_called if u.endswith(".2")}
                time.sleep(0.05)
                reply = wait_for_step(trainer, reply.step, 60)
            assert not called, called
            assert len(seen) >= 5, seen  # the window really sampled several steps
            # an evaluation well after the kill: the three survivors carry the model
            deadline = time.monotonic() + 180
            while status(trainer).last_eval_step < max(150, after_kill + 50):
                assert time.monotonic() < deadline, trainer.log.read_text()[-3000:]
                assert trainer.popen.poll() is None, trainer.log.read_text()[-3000:]
                time.sleep(0.2)
            trainer.popen.send_signal(signal.SIGTERM)
            assert trainer.wait(60) == 0
        finally:
            trainer.stop()
    finally:
        for proc in extra:
            proc.stop()
    curve = history(logdir, "killer")
    assert curve[-1]["step"] >= max(150, after_kill + 50)
    assert curve[-1]["test_accuracy"] >= 0.90, curve
    lines = [json.loads(x) for x in trainer.log.read_text().splitlines() if x.startswith("{")]
    finished = [x for x in lines if x["msg"] == "training finished"]
    assert finished and finished[0]["failed_steps"] <= 10
