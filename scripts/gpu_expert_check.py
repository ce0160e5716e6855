"""The expert runtime on a GPU, end to end: run this on any machine with a CUDA GPU.

    python scripts/gpu_expert_check.py [--json]            # needs the CUDA build of torch
    python scripts/gpu_expert_check.py --device cpu        # the same steps on the CPU (a rehearsal)

Three expert servers run as processes on 127.0.0.1 with ``--device cuda`` (``--seed 0``), started
together, plus a DHT node:

1. ``ffn`` (4 experts, declared in the DHT, checkpoints in a temporary folder): SERVING only once
   declared and warmed up (the log says how long the warm-up took, and with how many torch
   threads the server runs: the affinity mask's cores); the first forward and backward after
   SERVING are timed against later ones (the warm-up should leave nothing for them to load);
   forward outputs, input gradients and (after the server's Adam step on the GPU) the next
   outputs match the same experts built on the CPU from the same seed, within float32
   tolerance; then SIGTERM (the last checkpoint), whose files hold CPU tensors (loaded here
   without ``map_location``) and restore on the CPU with the same step count and outputs.
2. ``transformer`` (two inputs, one a bool mask), ``--max-batch-size 24`` with a long timeout:
   six concurrent requests of 1-8 rows form one batch, staged through the page-locked host
   buffers (several requests and dtypes per slot): each forward reply, each input gradient,
   the one optimizer step and the next outputs match the CPU.
3. ``oom`` (``tests/oom_expert.py``: asks the allocator for a petabyte on large batches): a
   forward and a backward that run out of device memory answer RESOURCE_EXHAUSTED naming
   --max-batch-size; the backward that failed half-way through autograd leaves no gradient
   behind (the next backward's step matches the CPU's), and the server keeps serving.

Then ``benchmarks/expert_throughput.py --backward --device cuda`` runs and its figures are
printed (the local limit is then the same module on the GPU, host-to-device copies included).

Exit 0 when every check passed. Results go to benchmarks/out/gpu/ (``--json``: one line).
This machine (CI) has no GPU: the CUDA run is documented in docs/kubernetes.md when done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from proc import free_ports  # noqa: E402

from services.common.healthcheck import wait_serving  # noqa: E402

HIDDEN, EXPERTS, SEED = 256, 4, 0
SEQ_HIDDEN, SEQ = 64, 5
MERGED_ROWS = (1, 2, 3, 4, 6, 8)  # one batch of sum(...) = --max-batch-size rows
OOM_EXPERT = ROOT / "tests" / "oom_expert.py"


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def twin(expert_cls: str, uid: str, index: int, hidden: int) -> Any:
    """Expert ``index`` of a server as it initialises it (seed + index), built on the CPU."""
    import torch

    from services.expert.backend import ExpertBackend, OptimizerConfig
    from services.expert.layers import get_expert_class

    if expert_cls == "oom":
        oom_expert()  # registers the class
    torch.manual_seed(SEED + index)
    return ExpertBackend(uid, get_expert_class(expert_cls), hidden, OptimizerConfig())


def oom_expert() -> Any:
    """``tests/oom_expert.py``, imported once (it registers the expert class ``oom``)."""
    sys.path.insert(0, str(OOM_EXPERT.parent))
    import oom_expert

    return oom_expert


def ffn_twins() -> dict[str, Any]:
    return {f"gpu.{i}": twin("ffn", f"gpu.{i}", i, HIDDEN) for i in range(EXPERTS)}


def diff(a: Any, b: Any) -> float:
    return (a.cpu() - b.cpu()).abs().max().item()


async def check_ffn(address: str, twins: dict[str, Any]) -> dict[str, Any]:
    """Largest absolute differences, server (device) vs CPU twin; first-call latencies."""
    import torch

    from services.expert.client import ExpertClient

    worst = {"forward": 0.0, "grad_inputs": 0.0, "after_step": 0.0}
    seconds: dict[str, list[float]] = {"forward": [], "backward": []}
    torch.manual_seed(1)
    async with ExpertClient(address) as client:
        for uid, local in twins.items():
            x, g = torch.randn(64, HIDDEN), torch.randn(64, HIDDEN)
            started = time.perf_counter()
            remote = (await client.forward(uid, [x]))[0]
            seconds["forward"].append(time.perf_counter() - started)
            worst["forward"] = max(worst["forward"], diff(remote, local.forward([x])[0]))
            started = time.perf_counter()
            grads = (await client.backward(uid, [x], [g]))[0]
            seconds["backward"].append(time.perf_counter() - started)
            worst["grad_inputs"] = max(
                worst["grad_inputs"], diff(grads, local.backward([x], [g])[0])
            )
            after = (await client.forward(uid, [x]))[0]
            worst["after_step"] = max(worst["after_step"], diff(after, local.forward([x])[0]))
    latency = {f"first_{m}_ms": round(1000 * s[0], 1) for m, s in seconds.items()} | {
        f"later_{m}_ms_median": round(1000 * statistics.median(s[1:]), 1)
        for m, s in seconds.items()
    }
    return {"max_abs_diff_vs_cpu": worst, "latency": latency}


async def check_merged(address: str) -> dict[str, Any]:
    """Six concurrent transformer requests as one batch: replies, gradients, step vs the CPU."""
    import copy

    import torch

    from services.expert.client import ExpertClient

    local = twin("transformer", "tr.0", 0, SEQ_HIDDEN)
    reference = copy.deepcopy(local.module)  # before any step: per-request input gradients
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(r, SEQ, SEQ_HIDDEN, generator=gen) for r in MERGED_ROWS]
    masks = [torch.rand(r, SEQ, generator=gen) < 0.8 for r in MERGED_ROWS]
    gs = [torch.randn(r, SEQ, SEQ_HIDDEN, generator=gen) for r in MERGED_ROWS]
    worst = {"forward": 0.0, "grad_inputs": 0.0, "after_step": 0.0}
    async with ExpertClient(address) as client:
        outs = await asyncio.gather(
            *(client.forward("tr.0", [x, m], timeout=120) for x, m in zip(xs, masks, strict=True))
        )
        for (out,), x, m in zip(outs, xs, masks, strict=True):
            worst["forward"] = max(worst["forward"], diff(out, local.forward([x, m])[0]))
        grads = await asyncio.gather(
            *(
                client.backward("tr.0", [x, m], [g], timeout=120)
                for x, m, g in zip(xs, masks, gs, strict=True)
            )
        )
        for (grad, _), x, m, g in zip(grads, xs, masks, gs, strict=True):
            leaf = x.clone().requires_grad_(True)
            reference(leaf, m).backward(g)
            worst["grad_inputs"] = max(worst["grad_inputs"], diff(grad, leaf.grad))
        local.backward([torch.cat(xs), torch.cat(masks)], [torch.cat(gs)])  # the one step
        probe = [torch.cat(xs), torch.cat(masks)]
        after = (await client.forward("tr.0", probe, timeout=120))[0]
        worst["after_step"] = diff(after, local.forward(probe)[0])
        steps = (await client.info("tr.0")).optimizer_steps
    return {"max_abs_diff_vs_cpu": worst, "optimizer_steps": steps}


async def check_out_of_memory(address: str, device: str) -> dict[str, Any]:
    """Out of device memory: RESOURCE_EXHAUSTED, no gradient left behind, still serving."""
    import grpc
    import torch

    from services.common.errors import CallError
    from services.expert.client import ExpertClient

    local = twin("oom", "oom.0", 0, HIDDEN)
    rows = oom_expert()
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(3)
    huge = torch.randn(rows.FORWARD_ROWS + 1, HIDDEN, generator=gen)
    big = torch.randn(rows.BACKWARD_ROWS + 1, HIDDEN, generator=gen)
    async with ExpertClient(address) as client:
        for name, call in (
            ("forward", client.forward("oom.0", [huge], timeout=120)),
            ("backward_in_autograd", client.backward("oom.0", [big], [big], timeout=120)),
        ):
            try:
                await call
                out[name] = "answered (expected RESOURCE_EXHAUSTED)"
            except CallError as exc:
                expected = f"ran out of {torch.device(device).type} memory"
                fine = exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and expected in exc.message
                out[name] = "ok" if fine else f"{exc.code.name}: {exc.message}"
        x, g = torch.randn(4, HIDDEN, generator=gen), torch.randn(4, HIDDEN, generator=gen)
        grads = (await client.backward("oom.0", [x], [g], timeout=120))[0]
        out["grad_inputs_diff"] = diff(grads, local.backward([x], [g])[0])
        after = (await client.forward("oom.0", [x], timeout=120))[0]
        out["after_step_diff"] = diff(after, local.forward([x])[0])
        out["optimizer_steps"] = (await client.info("oom.0")).optimizer_steps
    return out


def checkpoints_on_cpu(checkpoints: Path, twins: dict[str, Any]) -> dict[str, Any]:
    """The server's last checkpoints: CPU tensors (loaded without map_location), restored into
    fresh CPU experts with the same steps and outputs."""
    import torch

    from services.expert.checkpoints import list_checkpoints, load_latest

    devices: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            devices.add(value.device.type)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list | tuple):
            for v in value:
                collect(v)

    fresh = ffn_twins()
    out: dict[str, Any] = {"steps": 1e9, "outputs": 0.0}
    x = torch.randn(16, HIDDEN)
    for uid, backend in fresh.items():
        collect(torch.load(list_checkpoints(checkpoints, uid)[-1], weights_only=True))
        path = load_latest(backend, checkpoints)
        assert path is not None, f"no checkpoint for {uid} in {checkpoints}"
        out["steps"] = min(out["steps"], backend.steps)
        out["outputs"] = max(
            out["outputs"], diff(backend.forward([x])[0], twins[uid].forward([x])[0])
        )
    out["tensor_devices"] = sorted(devices)
    return out


def log_events(path: Path) -> dict[str, dict[str, Any]]:
    """The JSON log lines of a server, by message (the last of each)."""
    events = {}
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "msg" in event:
            events[event["msg"]] = event
    return events


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
    report: dict[str, Any] = {
        "device": args.device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "usable_cores": len(os.sched_getaffinity(0)),
    }
    # the comparison is float32 against float32: no TF32 shortcuts on the server either
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    ports = free_ports(8)
    work = Path(tempfile.mkdtemp(prefix="dmoe-gpu-"))
    common = ["--host", "127.0.0.1", "--seed", str(SEED), "--device", args.device,
              "--log-format", "json"]  # fmt: skip
    dht = start(["services.dht", "--host", "127.0.0.1", "--port", str(ports[0]),
                 "--metrics-port", str(ports[1])], out_dir / "dht.log")  # fmt: skip
    servers = {
        "ffn": (ports[2], ["--metrics-port", str(ports[3]),
                           "--initial-peers", f"127.0.0.1:{ports[0]}",
                           "--experts", f"gpu.[0:{EXPERTS}]", "--hidden-dim", str(HIDDEN),
                           "--update-period", "5", "--checkpoint-every", "0",
                           "--checkpoint-dir", str(work / "checkpoints")]),
        "transformer": (ports[4], ["--metrics-port", str(ports[5]), "--no-dht",
                                   "--experts", "tr.0", "--expert-cls", "transformer",
                                   "--hidden-dim", str(SEQ_HIDDEN),
                                   "--max-batch-size", str(sum(MERGED_ROWS)),
                                   "--batch-timeout-ms", "30000"]),
        "oom": (ports[6], ["--metrics-port", str(ports[7]), "--no-dht", "--experts", "oom.0",
                           "--expert-cls", "oom", "--custom-module", str(OOM_EXPERT),
                           "--hidden-dim", str(HIDDEN)]),
    }  # fmt: skip
    started = time.monotonic()
    procs = {
        name: start(
            ["services.expert", "--port", str(port), *common, *flags],
            out_dir / f"expert-{name}.log",
        )
        for name, (port, flags) in servers.items()
    }
    ok = True
    try:
        assert wait_serving(f"127.0.0.1:{ports[0]}", 60, alive=lambda: dht.poll() is None)
        for name, proc in procs.items():
            address = f"127.0.0.1:{servers[name][0]}"
            serving = wait_serving(address, 300, alive=lambda p=proc: p.poll() is None)
            assert serving, f"{name} server not SERVING: see {out_dir}/expert-{name}.log"
        report["start_to_serving_s"] = round(time.monotonic() - started, 1)
        events = log_events(out_dir / "expert-ffn.log")
        report["warm_up_s"] = events.get("experts warmed up", {}).get("seconds")
        report["torch_threads"] = events.get("expert server listening", {}).get("torch_threads")
        if args.device != "cpu":  # warmed up on CUDA only; threads from the affinity mask
            ok &= report["warm_up_s"] is not None
            ok &= report["torch_threads"] == report["usable_cores"]

        twins = ffn_twins()
        report["ffn"] = asyncio.run(check_ffn(f"127.0.0.1:{servers['ffn'][0]}", twins))
        ok &= all(v <= args.tolerance for v in report["ffn"]["max_abs_diff_vs_cpu"].values())
        merged = asyncio.run(check_merged(f"127.0.0.1:{servers['transformer'][0]}"))
        report["merged_batch"] = merged
        ok &= all(v <= args.tolerance for v in merged["max_abs_diff_vs_cpu"].values())
        ok &= merged["optimizer_steps"] == 1  # all six backwards in one batch
        oom = asyncio.run(check_out_of_memory(f"127.0.0.1:{servers['oom'][0]}", args.device))
        report["out_of_memory"] = oom
        ok &= oom["forward"] == "ok" and oom["backward_in_autograd"] == "ok"
        ok &= max(oom["grad_inputs_diff"], oom["after_step_diff"]) <= args.tolerance
        ok &= oom["optimizer_steps"] == 1

        procs["ffn"].send_signal(signal.SIGTERM)
        report["sigterm_exit_code"] = procs["ffn"].wait(timeout=120)
        restored = checkpoints_on_cpu(work / "checkpoints", twins)
        report["checkpoint_on_cpu"] = restored
        ok &= restored["steps"] == 1 and restored["outputs"] <= args.tolerance
        ok &= restored["tensor_devices"] == ["cpu"]
        ok &= report["sigterm_exit_code"] == 0
    finally:
        for proc in (*procs.values(), dht):
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
