"""Averaging inside the trainer service (issue 17): two trainer processes of one run and a DHT
node; the model has no remote experts (``tests/averaging_model.py``), so only averaging runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
from helpers import Proc, free_port

from services.proto import trainer_pb2, trainer_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def trainer(name: str, dht: Proc, logdir: Path, seed: int, *extra: str) -> Proc:
    args = [
        "services.trainer", "--initial-peers", dht.address, "--model-module",
        str(ROOT / "tests" / "averaging_model.py"), "--dataset", "digits", "--lr", "0",
        "--seed", str(seed), "--eval-every", "0", "--log-format", "json", "--metrics-port", "-1",
        "--identity-file", str(logdir / f"{name}.key"), "--average-period", "1.5",
        "--average-every", "5", "--target-group-size", "2", "--batch-size", "16",
        "--run-id", "averaging-test", *extra,
    ]  # fmt: skip
    return Proc(name, args, logdir, free_port())


def log_lines(proc: Proc) -> list[dict]:
    lines = []
    for text in proc.log.read_text().splitlines():
        if text.startswith("{"):
            lines.append(json.loads(text))
    return lines


def status(proc: Proc) -> trainer_pb2.StatusResponse:
    with grpc.insecure_channel(proc.address) as channel:
        return trainer_pb2_grpc.TrainerStub(channel).Status(trainer_pb2.StatusRequest(), timeout=10)


def test_a_late_trainer_downloads_the_state_then_both_average(tmp_path: Path) -> None:
    dht = Proc("dht", ["services.dht", "--metrics-port", "-1"], tmp_path, free_port())
    procs = [dht]
    try:
        dht.wait_healthy()
        # own init seeds, so that the download visibly replaces the late trainer's parameters
        first = trainer("first", dht, tmp_path, 1, "--init-seed", "1")
        procs.append(first)
        first.wait_healthy()
        # with --lr 0 the first trainer's parameters stay those it started with
        serving = next(x for x in log_lines(first) if x["msg"] == "trainer serving")
        assert any("training from scratch" in x["msg"] for x in log_lines(first))
        late = trainer("late", dht, tmp_path, 2, "--init-seed", "2")
        procs.append(late)
        late.wait_healthy()  # SERVING only after the download, before the first step
        got = next(x for x in log_lines(late) if x["msg"] == "state downloaded")
        assert got["parameters_before"] != serving["parameters"]  # another init seed
        assert got["parameters"] == serving["parameters"]  # exactly the first trainer's
        late_serving = next(x for x in log_lines(late) if x["msg"] == "trainer serving")
        assert late_serving["parameters"] == serving["parameters"]
        # and the two then average in the background (identical parameters stay identical)
        deadline = time.monotonic() + 180
        while True:
            reply = status(late)
            if reply.averaging.rounds_ok >= 1 and status(first).averaging.rounds_ok >= 1:
                break
            assert time.monotonic() < deadline, (reply.averaging, log_lines(late)[-5:])
            time.sleep(0.5)
        assert reply.averaging.run_id == "averaging-test"
        assert reply.averaging.last_outcome in ("ok", "alone", "failed")
        assert reply.averaging.last_round > 0 and reply.averaging.last_round_time > 0
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_trainers_of_one_run_start_from_the_same_model(tmp_path: Path) -> None:
    """Started together, neither has a state to download: both draw their initial parameters
    from the run id (not from their seeds), so averaging mixes copies of one model."""
    dht = Proc("dht", ["services.dht", "--metrics-port", "-1"], tmp_path, free_port())
    procs = [dht]
    try:
        dht.wait_healthy()
        a = trainer("a", dht, tmp_path, 1, "--load-state", "false")
        b = trainer("b", dht, tmp_path, 2, "--load-state", "false")
        procs += [a, b]
        a.wait_healthy()
        b.wait_healthy()
        inits = [next(x for x in log_lines(p) if x["msg"] == "initial parameters") for p in (a, b)]
        assert [x["from"] for x in inits] == ["run id", "run id"]
        assert inits[0]["init_seed"] == inits[1]["init_seed"]
        serving = [next(x for x in log_lines(p) if x["msg"] == "trainer serving") for p in (a, b)]
        assert [x["seed"] for x in serving] == [1, 2]  # the data order still differs
        assert serving[0]["parameters"] == serving[1]["parameters"]
    finally:
        for proc in reversed(procs):
            proc.stop()
