"""Throughput vs network latency: DMoE's concurrent trainers vs a sequential model-parallel client.

Reproduces the shape of Learning@home (Ryabinin & Gusev, NeurIPS 2020), section 4.1: a chain of
``--layers`` residual FFN blocks (``x + ffn(x)``, the runtime's ``ffn`` expert), forward only,
placed round-robin over ``--servers`` real expert servers (``python -m services.expert``, gRPC,
each server batching the requests of every caller per expert). After every block the caller
waits ``ping x Exp(1)`` seconds, as the paper's code does, with an asyncio sleep on the
*client* side: the delay is the network's, so it must not hold a server's compute thread (the
runtime's ``--simulate-latency-ms`` is a fixed delay on the reply path, not a distribution).

Two systems run against the same servers, over the same ``ExpertClient`` (the trainer's client):

* ``sequential``: one client sends its batch through the whole chain, hop after hop -- model
  parallelism over RPC. Throughput ~ B / (L (t + ping)), t the time of one hop without delay.
* ``dmoe``: J trainers do the same concurrently (``--trainers``); they are asyncio tasks spread
  over ``--trainer-procs`` OS processes (2 by default: the machine has 2 cores), so while one
  trainer waits out its delay the others keep the servers busy, and requests that meet at an
  expert are batched. J=1 is the sequential client by construction, which is why the default
  sweep measures J in {8, 32, 64} next to ``sequential`` (64: the paper's trainer count).
  Trainers start spread over the chain's blocks; started together at block 0 with no delay
  they would move as one herd and keep one server busy at a time.

Throughput is counted per hop: each block a batch passes inside the measuring window counts
B / L samples, so a window needs no whole passes (a sequential pass at 200 ms is seconds long)
and the figure has no edge effects. A window lasts ``--seconds`` and at least
``--min-hops`` x ping / J, so that a point at high ping still holds that many random delays
in all (their sum is what the figure averages). Each point
also reports the CPU cores servers and trainer processes used in its window, and samples per
CPU-second, which other load on the machine changes far less than samples/s.

Mapping to the paper (4 GPUs x 56 blocks = 224 blocks at hidden 1024, batch 2048, 64 trainer
processes, ping 0..200 ms): here 4 servers x 2 blocks = 8 blocks at hidden 256, batch 32, up to
64 trainers, on 2 shared CPU cores. What the curves depend on is the ratio of the delay to the
time of one hop (t ~ 7 ms here, so ping / t ~ 15 at 100 ms; a block of the paper's size is
~100 GFLOP forward, milliseconds on a 2020 GPU: the same order) and whether the J x B rows in
flight cover what the servers compute during one delay; L scales every curve alike.

    python benchmarks/throughput_latency.py                        # default sweep, ~6 min
    python benchmarks/throughput_latency.py --out docs/results --json
    python benchmarks/throughput_latency.py --layers 2 --pings 0,20 --trainers 2 --repeats 1

Writes ``throughput_latency.json`` and ``throughput_latency.png`` under ``--out``; with
``--json`` the last line printed is ``{"points": [...], "config": {...}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from proc import cpu_seconds, free_ports, stop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.healthcheck import wait_serving  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PREFIX = "block"


# ---------------- servers ----------------


def start_servers(
    count: int, layers: int, hidden: int, batch: int, logs: Path
) -> tuple[list[subprocess.Popen], list[str]]:
    """``count`` expert servers; block i lives on server i % count (round-robin, as the paper).

    ``--min-batch-size`` is one trainer's batch: a lone request runs at once instead of waiting
    out the batching timeout (which would tax the sequential client on every hop), and requests
    that queue while the compute thread is busy still go together into one batch."""
    procs, addresses = [], []
    ports = free_ports(count)
    for s, port in enumerate(ports):
        uids = ",".join(f"{PREFIX}.{i}" for i in range(s, layers, count))
        cmd = [
            sys.executable, "-m", "services.expert", "--no-dht", "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", "-1", "--experts", uids,
            "--expert-cls", "ffn", "--hidden-dim", str(hidden), "--seed", str(s),
            "--compute-threads", "1", "--torch-threads", "1", "--min-batch-size", str(batch),
            "--log-level", "warning",
        ]  # fmt: skip
        log = logs / f"expert{s}.log"
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=open(log, "w"),  # noqa: SIM115 - lives as long as the process
            )
        )
        addresses.append(f"127.0.0.1:{port}")
    for s, (proc, address) in enumerate(zip(procs, addresses, strict=True)):
        if not wait_serving(address, 120, alive=lambda p=proc: p.poll() is None):
            stop(procs)
            raise RuntimeError(f"expert{s} did not start: {(logs / f'expert{s}.log').read_text()}")
    return procs, addresses


# ---------------- trainer processes ----------------


@dataclass
class Window:
    """One measurement as a trainer process sees it: the delay and the counting window."""

    ping_s: float
    start: float  # time.monotonic(), shared by all processes on the machine
    end: float
    rng: random.Random
    hops: int = 0
    rpc_s: float = 0.0


async def trainer(chain: list, x0: Any, first: int, w: Window) -> None:
    """One trainer: pass after pass through the chain, ``ping x Exp(1)`` after every block.

    Each pass restarts from ``x0`` so values stay bounded however many passes a window holds.
    The first pass starts at block ``first``: trainers that all started at block 0 would move
    as one herd (with no delay nothing spreads them) and keep one server busy at a time.
    """
    while True:
        x = x0
        for client, uid in chain[first:]:
            sent = time.monotonic()
            x = (await client.forward(uid, [x]))[0]
            done = time.monotonic()
            if w.start <= done < w.end:
                w.hops += 1
                w.rpc_s += done - sent
            if w.ping_s > 0:
                await asyncio.sleep(w.ping_s * w.rng.expovariate(1.0))
            if time.monotonic() >= w.end:
                return
        first = 0


def _worker_main(
    conn: Connection, addresses: list[str], layers: int, hidden: int, batch: int
) -> None:
    """One OS process hosting any number of trainers as asyncio tasks; commands over ``conn``."""
    import torch

    torch.set_num_threads(1)
    from services.expert.client import ExpertClient

    async def main() -> None:
        clients = [ExpertClient(a) for a in addresses]
        chain = [(clients[i % len(clients)], f"{PREFIX}.{i}") for i in range(layers)]
        x0 = torch.randn(batch, hidden)
        for client, uid in chain:  # connect, first-call costs
            await client.forward(uid, [x0])
        conn.send("ready")
        loop = asyncio.get_running_loop()
        while (command := await loop.run_in_executor(None, conn.recv)) is not None:
            tasks, ping_s, start, end, seed, offset, stride = command
            w = Window(ping_s, start, end, random.Random(seed))
            await asyncio.gather(
                *(trainer(chain, x0, (offset + k * stride) % layers, w) for k in range(tasks))
            )
            conn.send((w.hops, w.rpc_s))
        for client in clients:
            await client.close()

    asyncio.run(main())


class Trainers:
    """``procs`` trainer processes, started once and reused for every point of the sweep."""

    def __init__(
        self, procs: int, addresses: list[str], layers: int, hidden: int, batch: int
    ) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for _ in range(procs):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(
                target=_worker_main, args=(theirs, addresses, layers, hidden, batch), daemon=True
            )
            p.start()
            self.conns.append(ours)
            self.procs.append(p)
        for conn in self.conns:
            if not conn.poll(180) or conn.recv() != "ready":
                raise RuntimeError("a trainer process did not start")

    def measure(
        self,
        trainers: int,
        ping_s: float,
        warmup: float,
        window: float,
        seed: int,
        server_pids: list[int],
    ) -> dict[str, float]:
        """Hops completed by ``trainers`` concurrent trainers inside the window, their RPC
        seconds, and the CPU seconds servers and trainer processes spent in the window;
        trainers are spread evenly over the processes."""
        n = len(self.conns)
        split = [trainers // n + (i < trainers % n) for i in range(n)]
        start = time.monotonic() + warmup
        active = [(conn, count) for conn, count in zip(self.conns, split, strict=True) if count > 0]
        # trainer k of process i starts at block i + k * n: all trainers spread over the chain
        for i, (conn, count) in enumerate(active):
            conn.send((count, ping_s, start, start + window, seed * 1000 + i, i, len(active)))
        client_pids = [p.pid for p in self.procs]
        time.sleep(max(0.0, start - time.monotonic()))
        cpu = [sum(map(cpu_seconds, server_pids)), sum(map(cpu_seconds, client_pids))]
        time.sleep(max(0.0, start + window - time.monotonic()))
        cpu = [
            sum(map(cpu_seconds, server_pids)) - cpu[0],
            sum(map(cpu_seconds, client_pids)) - cpu[1],
        ]
        hops, rpc = 0, 0.0
        for conn, _ in active:
            if not conn.poll(window + warmup + 120):
                raise RuntimeError("a trainer process stopped answering")
            h, r = conn.recv()
            hops, rpc = hops + h, rpc + r
        return {"hops": hops, "rpc_s": rpc, "server_cpu_s": cpu[0], "client_cpu_s": cpu[1]}

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # that process may be gone already
                conn.send(None)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


# ---------------- sweep ----------------


def systems(trainer_counts: list[int]) -> list[tuple[str, int]]:
    return [("sequential", 1)] + [("dmoe", j) for j in trainer_counts]


def run_sweep(args: argparse.Namespace, trainers: Trainers, server_pids: list[int]) -> list[dict]:
    """Every (system, J, ping) point ``--repeats`` times; repeats are the outer loop so a burst
    of load from elsewhere on the machine lands on one run of many points, not on one point."""
    runs: dict[tuple[str, int, float], list[dict[str, float]]] = {}
    for r in range(args.repeats):
        for ping in args.pings:
            for system, j in systems(args.trainers):
                window = max(args.seconds, args.min_hops * ping / 1000 / j)
                m = trainers.measure(j, ping / 1000, args.warmup, window, r, server_pids)
                run = {
                    "rate": m["hops"] * args.batch_size / args.layers / window,
                    "hop_ms": 1000 * m["rpc_s"] / m["hops"] if m["hops"] else float("nan"),
                    "server_cores": m["server_cpu_s"] / window,
                    "client_cores": m["client_cpu_s"] / window,
                }
                runs.setdefault((system, j, ping), []).append(run)
                print(
                    f"  run {r + 1}/{args.repeats} {system:<10} J={j:<3} ping {ping:>5g} ms: "
                    f"{run['rate']:9.1f} samples/s (hop RPC {run['hop_ms']:.2f} ms, "
                    f"CPU cores: servers {run['server_cores']:.2f}, trainers "
                    f"{run['client_cores']:.2f}; window {window:.1f} s)",
                    flush=True,
                )
    points = []
    for (system, j, ping), values in runs.items():
        rates = [v["rate"] for v in values]

        def mean(key: str, values: list[dict[str, float]] = values) -> float:
            return sum(v[key] for v in values) / len(values)

        points.append(
            {
                "system": system,
                "trainers": j,
                "ping_ms": ping,
                "samples_per_s": round(sum(rates) / len(rates), 2),
                "min": round(min(rates), 2),
                "max": round(max(rates), 2),
                "runs": [round(v, 2) for v in rates],
                "hop_rpc_ms": round(mean("hop_ms"), 3),
                "server_cpu_cores": round(mean("server_cores"), 2),
                "trainer_cpu_cores": round(mean("client_cores"), 2),
                # samples per CPU-second of servers + trainers: what the machine's other
                # load does not change (unlike samples/s at 0 ms, which is CPU-bound)
                "samples_per_cpu_s": round(
                    sum(rates)
                    / max(1e-9, sum(v["server_cores"] + v["client_cores"] for v in values)),
                    1,
                ),
            }
        )
    return points


def find(points: list[dict], system: str, j: int, ping: float) -> dict | None:
    return next(
        (p for p in points if (p["system"], p["trainers"], p["ping_ms"]) == (system, j, ping)),
        None,
    )


def hop_seconds(points: list[dict], args: argparse.Namespace) -> float | None:
    """t of the model-parallel formula: one hop's time with no delay, from sequential at 0 ms."""
    p = find(points, "sequential", 1, 0.0)
    return args.batch_size / args.layers / p["samples_per_s"] if p else None


def targets(points: list[dict], args: argparse.Namespace, at_ms: float = 100.0) -> list[str]:
    """Issue 13's targets: at 100 ms the largest J keeps >= 50% of its 0 ms throughput, the
    sequential client falls below 20% of its own."""
    lines = []
    j = max(args.trainers) if args.trainers else None
    for system, jj, bound, ok in (("dmoe", j, 0.5, "ge"), ("sequential", 1, 0.2, "lt")):
        zero, at = find(points, system, jj, 0.0), find(points, system, jj, at_ms)
        if zero is None or at is None:
            continue
        ratio = at["samples_per_s"] / zero["samples_per_s"]
        holds = ratio >= bound if ok == "ge" else ratio < bound
        lines.append(
            f"{system} J={jj}: {at_ms:g} ms keeps {ratio:.1%} of 0 ms "
            f"(target {'>=' if ok == 'ge' else '<'} {bound:.0%}): {'holds' if holds else 'MISSED'}"
        )
    return lines


def markdown_table(points: list[dict], args: argparse.Namespace) -> str:
    """One row per system, one column per ping: mean (min-max), and % of the 0 ms mean."""
    lines = [
        "| system | " + " | ".join(f"{p:g} ms" for p in args.pings) + " |",
        "| --- |" + " ---: |" * len(args.pings),
    ]
    for system, j in systems(args.trainers):
        zero = find(points, system, j, 0.0)
        cells = []
        for ping in args.pings:
            p = find(points, system, j, ping)
            cell = f"{p['samples_per_s']:,.0f} ({p['min']:,.0f}-{p['max']:,.0f})"
            if zero is not None and ping != 0:
                cell += f", {p['samples_per_s'] / zero['samples_per_s']:.0%}"
            cells.append(cell)
        name = "sequential" if system == "sequential" else f"dmoe J={j}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------- plot ----------------


def plot(points: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    t = hop_seconds(points, args)
    max_ping = max(args.pings)
    fine = [max_ping * i / 200 for i in range(201)]
    for k, (system, j) in enumerate(systems(args.trainers)):
        series = sorted(
            (p for p in points if p["system"] == system and p["trainers"] == j),
            key=lambda p: p["ping_ms"],
        )
        if not series:
            continue
        color = colors[k % len(colors)]
        xs = [p["ping_ms"] for p in series]
        label = "sequential (model parallel over RPC)" if system == "sequential" else f"dmoe, J={j}"
        ax.plot(xs, [p["samples_per_s"] for p in series], "o-", color=color, label=label)
        ax.fill_between(
            xs, [p["min"] for p in series], [p["max"] for p in series], color=color, alpha=0.2
        )
        if t is not None and system == "dmoe" and j == max(args.trainers):
            # closed-loop bound: J batches in flight, each hop t + ping, capped by 0 ms
            cap = series[0]["samples_per_s"] if series[0]["ping_ms"] == 0 else float("inf")
            bound = [min(cap, j * args.batch_size / args.layers / (t + p / 1000)) for p in fine]
            ax.plot(
                fine, bound, ":", color=color, label=f"bound min(X(0), JB / (L (t+ping))), J={j}"
            )
    if t is not None:
        theory = [args.batch_size / args.layers / (t + p / 1000) for p in fine]
        ax.plot(
            fine,
            theory,
            "--",
            color="black",
            label=f"paper's model-parallel curve B / (L (t+ping)), t={1000 * t:.1f} ms",
        )
    ax.set_yscale("log")
    ax.set_xlabel("ping: mean delay after every block (ms; each delay ping x Exp(1))")
    ax.set_ylabel("throughput (samples/s, log scale)")
    ax.set_title(
        f"Throughput vs latency: {args.layers} FFN blocks (hidden {args.hidden_dim}) on "
        f"{args.servers} expert servers, batch {args.batch_size}",
        fontsize=10,
    )
    ax.set_xticks(sorted(set(args.pings)))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=2,
        title=f"shaded: min..max over {args.repeats} runs",
        title_fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------- main ----------------


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="blocks in the chain (L)")
    parser.add_argument("--servers", type=int, default=4, help="expert server processes")
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per trainer batch (B)")
    parser.add_argument(
        "--pings", type=float_list, default=[0, 50, 100, 200], help="mean delays, ms"
    )
    parser.add_argument(
        "--trainers", type=int_list, default=[8, 32, 64], help="dmoe's concurrent trainers (J)"
    )
    parser.add_argument("--trainer-procs", type=int, default=2, help="OS processes they share")
    parser.add_argument("--seconds", type=float, default=4.0, help="shortest measuring window")
    parser.add_argument(
        "--min-hops",
        type=int,
        default=100,
        help="a window lasts at least this many mean delays divided by J",
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", action="store_true")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.layers < 1 or args.servers < 1 or args.repeats < 1 or not args.pings:
        raise SystemExit("--layers, --servers and --repeats must be >= 1, --pings non-empty")
    started = time.monotonic()
    load_before = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dmoe-tl-") as tmp:
        servers, addresses = start_servers(
            args.servers, args.layers, args.hidden_dim, args.batch_size, Path(tmp)
        )
        trainers = None
        try:
            procs = max(1, min(args.trainer_procs, max([1, *args.trainers])))
            trainers = Trainers(procs, addresses, args.layers, args.hidden_dim, args.batch_size)
            points = run_sweep(args, trainers, [p.pid for p in servers])
        finally:
            if trainers is not None:
                trainers.close()
            stop(servers)
    t = hop_seconds(points, args)
    config = {
        "layers": args.layers,
        "servers": args.servers,
        "hidden_dim": args.hidden_dim,
        "batch_size": args.batch_size,
        "trainer_procs": procs,
        "repeats": args.repeats,
        "delay": "client-side asyncio sleep of ping x Exp(1) after every block",
        "hop_ms_at_0": round(1000 * t, 3) if t else None,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": len(os.sched_getaffinity(0)),
        "machine": platform.platform(),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "wall_s": round(time.monotonic() - started, 1),
    }
    report = {"points": points, "config": config}
    (args.out / "throughput_latency.json").write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_plot:
        plot(points, args, args.out / "throughput_latency.png")
    print(
        f"\nsamples/s, mean (min-max) over {args.repeats} runs, and the share of the same "
        f"system's 0 ms figure; L={args.layers}, B={args.batch_size}\n"
    )
    print(markdown_table(points, args))
    if t:
        print(f"one hop without delay (sequential, 0 ms): {1000 * t:.2f} ms")
    for line in targets(points, args):
        print(line)
    print(f"wall {config['wall_s']} s; outputs in {args.out}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
