"""The expert runtime on a GPU, end to end: run this on any machine with a CUDA GPU.

    python scripts/gpu_expert_check.py [--json]            # needs the CUDA build of torch
    python scripts/gpu_expert_check.py --device cpu        # the same steps on the CPU (a rehearsal)

1. starts a DHT node and an expert server with ``--device cuda`` (``--seed 0``, checkpoints in
   a temporary folder) as processes on 127.0.0.1, and waits until the server is SERVING,
   which it becomes only once its experts are declared in the DHT;
2. checks the numbers: the same experts built on the CPU from the same seed give the same
   forward outputs, input gradients, and (after the server's Adam step on the GPU) the same
   next outputs, within float32 tolerance;
3. stops the server with SIGTERM (its last checkpoint) and restores that checkpoint on the CPU
   (``torch.load(map_location=cpu)``): the step count and the outputs match;
4. runs ``benchmarks/expert_throughput.py --backward --device cuda`` and prints its figures
   (the local limit is then the same module on the GPU, host-to-device copies included).

Exit 0 when every check passed. Results go to benchmarks/out/gpu/ (``--json``: one line).
This machine (CI) has no GPU: the CUDA run is documented in docs/kubernetes.md when done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from proc import free_ports  # noqa: E402

from services.common.healthcheck import wait_serving  # noqa: E402

HIDDEN, EXPERTS, SEED = 256, 4, 0


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def cpu_twins() -> dict[str, object]:
    """The server's experts as it initialises them (seed + i, built on the CPU), on the CPU."""
    import torch

    from services.expert.backend import ExpertBackend, OptimizerConfig
    from services.expert.layers import get_expert_class

    twins = {}
    for i in range(EXPERTS):
        torch.manual_seed(SEED + i)
        uid = f"gpu.{i}"
        twins[uid] = ExpertBackend(uid, get_expert_class("ffn"), HIDDEN, OptimizerConfig())
    return twins


async def compare(address: str, twins: dict) -> dict[str, float]:
    """Largest absolute differences, server (device) vs CPU twin."""
    import torch

    from services.expert.client import ExpertClient

    worst = {"forward": 0.0, "grad_inputs": 0.0, "after_step": 0.0}
    torch.manual_seed(1)
    async with ExpertClient(address) as client:
        for uid, twin in twins.items():
            x, g = torch.randn(64, HIDDEN), torch.randn(64, HIDDEN)
            remote = (await client.forward(uid, [x]))[0]
            worst["forward"] = max(
                worst["forward"], (remote - twin.forward([x])[0]).abs().max().item()
            )
            grads = (await client.backward(uid, [x], [g]))[0]
            local = twin.backward([x], [g])[0]
            worst["grad_inputs"] = max(worst["grad_inputs"], (grads - local).abs().max().item())
            after = (await client.forward(uid, [x]))[0]
            worst["after_step"] = max(
                worst["after_step"], (after - twin.forward([x])[0]).abs().max().item()
            )
    return worst


def restore_on_cpu(checkpoints: Path, twins: dict) -> dict[str, float]:
    """The server's last checkpoints restored into fresh CPU experts: steps and outputs."""
    import torch

    from services.expert.checkpoints import load_latest

    fresh = cpu_twins()
    out = {"steps": 1e9, "outputs": 0.0}
    x = torch.randn(16, HIDDEN)
    for uid, backend in fresh.items():
        path = load_latest(backend, checkpoints)
        assert path is not None, f"no checkpoint for {uid} in {checkpoints}"
        out["steps"] = min(out["steps"], backend.steps)
        diff = (backend.forward([x])[0] - twins[uid].forward([x])[0]).abs().max().item()
        out["outputs"] = max(out["outputs"], diff)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu: a rehearsal)")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--skip-benchmark", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    out_dir = ROOT / "benchmarks/out/gpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "device": args.device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    # the comparison is float32 against float32: no TF32 shortcuts on the server either
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    dht_port, dht_metrics, port, metrics = free_ports(4)
    work = Path(tempfile.mkdtemp(prefix="dmoe-gpu-"))
    dht = start(["services.dht", "--host", "127.0.0.1", "--port", str(dht_port),
                 "--metrics-port", str(dht_metrics)], out_dir / "dht.log")  # fmt: skip
    expert_cmd = ["services.expert", "--host", "127.0.0.1", "--port", str(port),
                  "--metrics-port", str(metrics), "--initial-peers", f"127.0.0.1:{dht_port}",
                  "--experts", f"gpu.[0:{EXPERTS}]", "--hidden-dim", str(HIDDEN),
                  "--seed", str(SEED), "--device", args.device, "--update-period", "5",
                  "--checkpoint-dir", str(work / "checkpoints"),
                  "--checkpoint-every", "0"]  # fmt: skip
    expert = start(expert_cmd, out_dir / "expert.log")
    ok = True
    try:
        started = time.monotonic()
        assert wait_serving(f"127.0.0.1:{dht_port}", 60, alive=lambda: dht.poll() is None)
        serving = wait_serving(f"127.0.0.1:{port}", 300, alive=lambda: expert.poll() is None)
        assert serving, f"expert not SERVING (declared): see {out_dir / 'expert.log'}"
        report["start_to_declared_s"] = round(time.monotonic() - started, 1)
        twins = cpu_twins()
        worst = asyncio.run(compare(f"127.0.0.1:{port}", twins))
        report["max_abs_diff_vs_cpu"] = worst
        ok &= all(v <= args.tolerance for v in worst.values())
        expert.send_signal(signal.SIGTERM)
        report["sigterm_exit_code"] = expert.wait(timeout=120)
        restored = restore_on_cpu(work / "checkpoints", twins)
        report["checkpoint_on_cpu"] = restored
        ok &= restored["steps"] == 1 and restored["outputs"] <= args.tolerance
        ok &= report["sigterm_exit_code"] == 0
    finally:
        for proc in (expert, dht):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    if not args.skip_benchmark:
        bench = subprocess.run(
            [sys.executable, "benchmarks/expert_throughput.py", "--backward", "--device",
             args.device, "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        (out_dir / "expert_throughput.txt").write_text(bench.stdout + bench.stderr)
        ok &= bench.returncode == 0
        if bench.returncode == 0:
            report["expert_throughput"] = json.loads(bench.stdout.strip().splitlines()[-1])
    report["ok"] = bool(ok)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
