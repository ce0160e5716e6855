"""``--device auto|cpu|cuda[:n]`` (services/expert/device.py): auto picks CUDA when torch sees a
GPU, else the CPU; an explicit cuda that cannot work stops the server at start (exit 2) with a
message, instead of failing every batch. This machine has no GPU: the CUDA branch of ``auto``
is checked by scripts/gpu_expert_check.sh on a GPU machine."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_async

from services.expert.__main__ import build_parser
from services.expert.device import device_name, resolve_device

ROOT = Path(__file__).resolve().parent.parent


def test_device_names() -> None:
    for text, name in (("cpu", "cpu"), ("CUDA", "cuda"), ("cuda:1", "cuda:1"), (" auto ", "auto")):
        assert device_name(text) == name
    for bad in ("gpu", "cuda:", "cuda:x", "mps", "", "cpu:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="cpu, cuda, cuda:N or auto"):
            device_name(bad)
    assert build_parser().parse_args(["--device", "auto"]).device == "auto"
    assert build_parser().parse_args([]).device == "cpu"


def test_auto_follows_what_torch_sees() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match=r"CUDA is not available .* use --device auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_server_refuses_cuda_at_start_and_runs_auto_on_cpu(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "services.expert", "--no-dht", "--port", "0",
            "--metrics-port", "-1", "--experts", "e.[0:2]", "--hidden-dim", "8",
            "--log-format", "json"]  # fmt: skip
    refused = subprocess.run(
        [*base, "--device", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2, refused.stderr
    assert "CUDA is not available" in refused.stderr
    bad = subprocess.run(
        [*base, "--device", "gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "expected cpu, cuda, cuda:N or auto" in bad.stderr
    # auto: the server starts on the CPU and says so
    server = subprocess.Popen(
        [*base, "--device", "auto"], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stderr is not None
        for line in server.stderr:
            event = json.loads(line)
            if event.get("msg") == "compute device":
                assert event["requested"] == "auto" and event["device"] == "cpu"
            if event.get("msg") == "expert server listening":
                break
        else:
            raise AssertionError(f"the server exited ({server.wait()})")
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_parallelism_follows_the_affinity_mask_on_every_device() -> None:
    """A container's CPU set, not the host's cores (os.cpu_count), sizes the torch threads."""
    import os

    from services.expert.scheduler import default_parallelism

    cores = len(os.sched_getaffinity(0))
    assert default_parallelism("cuda", 4) == (1, cores)
    assert default_parallelism("cuda:1", 1) == (1, cores)
    workers, threads = default_parallelism("cpu", 4)
    assert workers == min(cores, 4) and threads == max(1, cores // workers)


def _block_with_statistics(hidden_dim: int) -> torch.nn.Module:
    """A block with batch-norm buffers and dropout: state a warm-up could disturb."""
    return torch.nn.Sequential(
        torch.nn.Linear(hidden_dim, hidden_dim),
        torch.nn.BatchNorm1d(hidden_dim),
        torch.nn.Dropout(0.5),
    )


@pytest.mark.parametrize("expert_cls", ["ffn", "transformer", "stats"])
def test_warm_up_changes_nothing(expert_cls: str) -> None:
    """The warm-up a GPU server runs before SERVING: a forward and a backward, no step; weights,
    buffers, optimizer state, step count and the random number generator are as before."""
    from services.expert.backend import ExpertBackend, OptimizerConfig
    from services.expert.layers import Schema, get_expert_class, register_expert_class

    vector = lambda h: [Schema((h,))]  # noqa: E731
    register_expert_class("stats", inputs=vector, outputs=vector)(_block_with_statistics)
    backend = ExpertBackend("e.0", get_expert_class(expert_cls), 8, OptimizerConfig())
    x = [s.sample(2) for s in backend.input_schemas]
    # one step first: optimizer state exists, and the warm-up must not touch it either
    backend.backward(x, [s.sample(2) for s in backend.output_schemas])
    before = backend.snapshot_state()
    rng = torch.get_rng_state()
    backend.warm_up()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in backend.module.parameters())
    after = backend.snapshot_state()
    assert after["steps"] == before["steps"] == 1
    for name, value in before["model"].items():
        assert torch.equal(after["model"][name], value), name
    for index, state in before["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(after["optimizer"]["state"][index][key], value), (index, key)


def test_snapshots_are_host_copies_that_later_steps_do_not_change() -> None:
    """What a checkpoint holds: tensors in host memory, not sharing storage with the expert's
    (so later steps do not change them), loadable into another expert as they are."""
    from services.expert.backend import ExpertBackend, OptimizerConfig
    from services.expert.layers import get_expert_class

    backend = ExpertBackend("ffn.0", get_expert_class("ffn"), 8, OptimizerConfig())
    x = torch.randn(4, 8)
    backend.backward([x], [x])
    snapshot = backend.snapshot_state()
    copied = {k: v.clone() for k, v in snapshot["model"].items()}
    backend.backward([x], [x])
    live = backend.module.state_dict()
    for name, value in snapshot["model"].items():
        assert value.device.type == "cpu"
        assert torch.equal(value, copied[name]) and value.data_ptr() != live[name].data_ptr()
    assert hasattr(snapshot["model"], "_metadata")  # module versions, as state_dict() has them
    for state in snapshot["optimizer"]["state"].values():
        assert all(v.device.type == "cpu" for v in state.values())
    other = ExpertBackend("ffn.0", get_expert_class("ffn"), 8, OptimizerConfig())
    other.load_state_dict(snapshot)
    assert other.steps == 1


@run_async
async def test_work_runs_once_on_every_compute_thread() -> None:
    """How a GPU server warms up: once on each compute thread (cuBLAS handles are per thread),
    while the threads keep the torch settings of compute threads."""
    import threading

    from services.expert.scheduler import DeviceScheduler

    scheduler = DeviceScheduler("cpu", workers=3, torch_threads=1)
    scheduler.start()
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def work() -> None:
        with lock:
            seen.append((threading.current_thread().name, torch.get_num_threads()))

    try:
        await scheduler.on_each_thread(work)
        await scheduler.on_each_thread(work)  # threads that exist and idle take part too
    finally:
        await scheduler.close()
    names = {name for name, _ in seen}
    assert len(seen) == 6 and len(names) == 3
    assert all(name.startswith("compute-cpu") and n == 1 for name, n in seen)
