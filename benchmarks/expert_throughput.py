"""Throughput of the expert runtime against the local compute limit (hivemind's benchmark shape).

One expert server process (``python -m services.expert``) hosts ``--experts`` ffn experts;
``--clients`` separate OS processes each send ``--batches-per-client`` batches of
``--batch-size`` rows to random experts through ``ExpertClient``: with ``--backward`` a forward
and then a backward of the same batch, otherwise a forward only. In the same run the local
compute limit is measured in this process: the same module, no RPC, forward then recomputed
forward + backward + optimizer step (forward only without ``--backward``), batch 256, all cores,
in two configurations (one module on all cores as torch intra-op threads, and one module per
core on one thread each), before and after the remote run; the best figure is the limit the
ratio is taken against.

    python benchmarks/expert_throughput.py --backward [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from proc import cpu_seconds, free_ports

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.healthcheck import wait_serving  # noqa: E402

# ---------------- local compute limit ----------------


def _local_worker(
    hidden: int, batch: int, seconds: float, backward: bool, out: list, device: str = "cpu"
) -> None:
    import torch

    from services.expert.backend import ExpertBackend, OptimizerConfig
    from services.expert.layers import get_expert_class

    expert = ExpertBackend(
        "local.0", get_expert_class("ffn"), hidden, OptimizerConfig(), device=device
    )
    x, g = torch.randn(batch, hidden), torch.randn(batch, hidden)

    def step() -> None:  # outputs back on the host, as the server's (a no-op on the CPU)
        [out.cpu() for out in expert.forward([x])]
        if backward:
            [grad.cpu() for grad in expert.backward([x], [g])]

    for _ in range(3):
        step()
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        step()
        n += 1
    out.append(n * batch / (time.perf_counter() - started))


def local_limit(
    hidden: int, seconds: float, backward: bool, cores: int, batch: int = 256, device: str = "cpu"
) -> dict[str, float]:
    """Samples/s of the module in this process (inputs and outputs on the host, as the
    server has them: on a GPU that includes the copies to and from the device)."""
    import torch

    results: dict[str, float] = {}
    torch.set_num_threads(cores)
    out: list[float] = []
    _local_worker(hidden, batch, seconds, backward, out, device)
    results["all_cores_one_module"] = out[0]
    torch.set_num_threads(1)
    out = []
    cpu = time.process_time()
    threads = [
        threading.Thread(target=_local_worker, args=(hidden, batch, seconds, backward, out, device))
        for _ in range(cores)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results["one_module_per_core"] = sum(out)
    # samples per CPU-second (single-threaded modules: no spinning): insensitive to other
    # processes sharing the machine, unlike samples/s
    results["per_cpu_second"] = sum(out) * seconds / max(1e-9, time.process_time() - cpu)
    torch.set_num_threads(cores)
    return results


# ---------------- clients ----------------


def _client_main(
    index: int,
    address: str,
    uids: list[str],
    hidden: int,
    batch: int,
    batches: int,
    backward: bool,
    link_max_bytes: int,
    ready: mp.Barrier,
    go: mp.Event,
    results: mp.Queue,
) -> None:
    import torch

    torch.set_num_threads(1)
    from services.expert.client import ExpertClient

    async def run() -> None:
        async with ExpertClient(address, link_max_bytes=link_max_bytes) as client:
            rng = random.Random(index)
            x = torch.randn(batch, hidden)
            for uid in uids:  # warm-up: connect, first-call costs
                out = (await client.forward(uid, [x]))[0]
                if backward:
                    await client.backward(uid, [x], [torch.randn_like(out)])
            ready.wait()
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(batches):
                uid = rng.choice(uids)
                x = torch.randn(batch, hidden)
                out = (await client.forward(uid, [x]))[0]
                if backward:
                    await client.backward(uid, [x], [torch.randn_like(out)])
            results.put(
                (index, started, time.perf_counter(), batches * batch, time.process_time() - cpu)
            )

    asyncio.run(run())


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid`` (name from /proc: the main thread is the pid's)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            head, tail = (task / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = tail.split()
        name = head.split("(", 1)[1]
        out[f"{task.name}:{name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(
            r"^(dmoe_expert_(?:batch_\w+|compute_seconds|queue_wait_seconds)_(?:sum|count))"
            r'\{method="(\w+)"\} (\S+)$',
            line,
        )
        if m:
            values[f"{m.group(1)}:{m.group(2)}"] = float(m.group(3))
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches-per-client", type=int, default=32)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument(
        "--unary",
        action="store_true",
        help="clients make one unary call per request instead of using the server's link",
    )
    parser.add_argument(
        "--expert-cls", default="ffn", help="server's expert class (nop: RPC overhead only)"
    )
    parser.add_argument("--local-seconds", type=float, default=4.0)
    parser.add_argument("--server-args", default="", help="extra flags for the expert server")
    parser.add_argument(
        "--device", default="cpu", help="the server's --device and the local limit's (cuda)"
    )
    parser.add_argument(
        "--batch-curve",
        action="store_true",
        help="also measure the local limit at batches of 64 and 128 rows (the sizes a "
        "closed loop of --clients forms): the ceiling no server can pass at those sizes",
    )
    parser.add_argument("--profile", default=None, help="py-spy the server into this SVG/txt")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    # measured before and after the remote run; the better of the two counts, so a burst of
    # load from other processes during one measurement cannot inflate the ratio
    limits = local_limit(
        args.hidden_dim, args.local_seconds, args.backward, cores, device=args.device
    )

    port, metrics_port = free_ports(2)
    address = f"127.0.0.1:{port}"
    uids = [f"expert.{i}" for i in range(args.experts)]
    cmd = [
        sys.executable, "-m", "services.expert", "--no-dht", "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(metrics_port),
        "--experts", f"expert.[0:{args.experts}]", "--expert-cls", args.expert_cls,
        "--hidden-dim", str(args.hidden_dim), "--log-level", "warning", "--device", args.device,
        *args.server_args.split(),
    ]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=ROOT)
    profiler = None
    try:
        if not wait_serving(address, 60):
            raise TimeoutError(f"expert server at {address} did not start")
        ctx = mp.get_context("spawn")
        ready, go, results = ctx.Barrier(args.clients + 1), ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(
                target=_client_main,
                args=(
                    i,
                    address,
                    uids,
                    args.hidden_dim,
                    args.batch_size,
                    args.batches_per_client,
                    args.backward,
                    0 if args.unary else 1 << 20,
                    ready,
                    go,
                    results,
                ),
            )
            for i in range(args.clients)
        ]
        for p in procs:
            p.start()
        ready.wait(timeout=300)
        before = _scrape(metrics_port)
        if args.profile:
            profiler = subprocess.Popen(
                ["py-spy", "record", "--nonblocking", "-r", "200", "-o", args.profile,
                 "--format", "raw" if args.profile.endswith(".txt") else "flamegraph",
                 "--pid", str(server.pid), "--threads"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
        server_cpu = cpu_seconds(server.pid)
        threads_before = _thread_cpu(server.pid)
        start = time.perf_counter()
        go.set()
        done = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        elapsed = max(end for _, _, end, _, _ in done) - start
        server_cpu = cpu_seconds(server.pid) - server_cpu
        threads_after = _thread_cpu(server.pid)
        samples = sum(n for *_, n, _ in done)
        client_cpu = sum(c for *_, c in done)
        after = _scrape(metrics_port)
    finally:
        if profiler is not None:
            profiler.send_signal(2)
            profiler.wait(timeout=30)
        server.terminate()
        server.wait(timeout=30)
    again = local_limit(
        args.hidden_dim, args.local_seconds, args.backward, cores, device=args.device
    )
    limits = {k: max(v, again[k]) for k, v in limits.items()}
    per_cpu_second = limits.pop("per_cpu_second")
    limit = max(limits.values())

    curve = {}
    if args.batch_curve:
        for rows in (args.batch_size, 2 * args.batch_size):
            at = local_limit(
                args.hidden_dim, args.local_seconds, args.backward, cores, rows, args.device
            )
            curve[rows] = max(at["all_cores_one_module"], at["one_module_per_core"])

    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    def mean(what: str, method: str) -> float:
        count = delta.get(f"dmoe_expert_{what}_count:{method}", 0.0)
        return delta.get(f"dmoe_expert_{what}_sum:{method}", 0.0) / count if count else 0.0

    throughput = samples / elapsed
    loop = f"{server.pid}:"  # the main thread's id is the pid
    loop_cpu = sum(
        v - threads_before.get(k, 0.0) for k, v in threads_after.items() if k.startswith(loop)
    )
    compute_s = sum(
        delta.get(f"dmoe_expert_compute_seconds_sum:{m}", 0.0) for m in ("forward", "backward")
    )
    report = {
        "transport": "unary" if args.unary else "link",
        "samples_per_s": round(throughput, 1),
        "local_limit_samples_per_s": round(limit, 1),
        "ratio": round(throughput / limit, 3),
        "backward": args.backward,
        "device": args.device,
        "local_limits": {k: round(v, 1) for k, v in limits.items()},
        "ratio_vs_all_cores_one_module": round(throughput / limits["all_cores_one_module"], 3),
        "elapsed_s": round(elapsed, 3),
        "samples": samples,
        "experts": args.experts,
        "clients": args.clients,
        "batch_size": args.batch_size,
        "mean_batch_samples": {
            m: round(mean("batch_size_samples", m), 1) for m in ("forward", "backward")
        },
        "mean_batch_requests": {
            m: round(mean("batch_requests", m), 2) for m in ("forward", "backward")
        },
        "mean_compute_ms": {
            m: round(1000 * mean("compute_seconds", m), 2) for m in ("forward", "backward")
        },
        "mean_queue_wait_ms": {
            m: round(1000 * mean("queue_wait_seconds", m), 2) for m in ("forward", "backward")
        },
        "compute_busy_s_per_s": round(compute_s / elapsed, 2),
        "server_cpu_s_per_s": round(server_cpu / elapsed, 2),
        "server_thread_cpu_s": {
            k: round(v - threads_before.get(k, 0.0), 2)
            for k, v in sorted(threads_after.items(), key=lambda kv: -kv[1])
            if v - threads_before.get(k, 0.0) > 0.05
        },
        "cpu_efficiency": round(samples / (server_cpu + client_cpu) / per_cpu_second, 3),
        # where the CPU goes, per sample (robust to other processes on the machine): the
        # server's main thread runs the event loop, its other threads are mostly the compute
        # workers (also grpc's poller and the metrics server)
        "cpu_us_per_sample": {
            "local": round(1e6 / per_cpu_second, 1),
            "server_event_loop": round(1e6 * loop_cpu / samples, 1),
            "server_other_threads": round(1e6 * (server_cpu - loop_cpu) / samples, 1),
            "clients": round(1e6 * client_cpu / samples, 1),
        },
        "clients_cpu_s_per_s": round(client_cpu / elapsed, 2),
    }
    if curve:
        # compute alone (no RPC, no server, no clients) at the batch sizes a closed loop forms
        report["local_limit_by_batch"] = {str(k): round(v, 1) for k, v in curve.items()}
        report["local_limit_by_batch_ratio"] = {
            str(k): round(v / limits["all_cores_one_module"], 3) for k, v in curve.items()
        }
    print(
        f"{'forward+backward' if args.backward else 'forward'}: {throughput:,.0f} samples/s "
        f"over {args.clients} client processes, {args.experts} experts, batch {args.batch_size}\n"
        f"local compute limit: {limit:,.0f} samples/s "
        f"(all cores on one module {limits['all_cores_one_module']:,.0f}, "
        f"one module per core {limits['one_module_per_core']:,.0f})\n"
        f"ratio: {throughput / limit:.3f} "
        f"(vs all cores on one module: {report['ratio_vs_all_cores_one_module']:.3f})\n"
        f"server: mean batch {report['mean_batch_samples']} samples, "
        f"{report['mean_batch_requests']} requests, compute {report['mean_compute_ms']} ms, "
        f"queue wait {report['mean_queue_wait_ms']} ms, "
        f"compute threads busy {report['compute_busy_s_per_s']} s/s\n"
        f"CPU: server {report['server_cpu_s_per_s']} cores, "
        f"clients {report['clients_cpu_s_per_s']} cores (of {cores}); samples per CPU-second "
        f"vs local: {report['cpu_efficiency']}\n"
        f"server CPU seconds by thread: {report['server_thread_cpu_s']}\n"
        f"CPU us per sample: {report['cpu_us_per_sample']}"
    )
    if curve:
        print(
            "local limit by batch size (compute only, best of both layouts): "
            + ", ".join(
                f"{k} rows {v:,.0f} samples/s ({v / limits['all_cores_one_module']:.2f} "
                "of the all-cores limit)"
                for k, v in curve.items()
            )
        )
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
