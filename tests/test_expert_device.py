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
