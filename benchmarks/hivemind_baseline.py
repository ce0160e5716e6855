"""dmoe against hivemind 1.1.12 in the same run: ``python benchmarks/hivemind_baseline.py``.

Why: the issue-12 targets compare against hivemind, and figures copied from an old issue were
measured on another day at another load. This driver runs our benchmark and a hivemind run of
the same shape one after the other (ours, hivemind, ours, hivemind, ... ``--runs`` pairs), so
each pair sees the same machine and load, and prints both with their ratios.

hivemind lives in its own virtual environment, ``benchmarks/out/hivemind-venv`` (git-ignored),
made on first use by ``hivemind_venv.py`` (``--setup-only`` makes it and stops):
``hivemind==1.1.12`` with the CPU ``torch==2.13.0`` wheel (here from the local wheel directory;
elsewhere add ``--pip-args "--extra-index-url https://download.pytorch.org/whl/cpu"``).
hivemind is never installed into the dmoe environment: this file runs itself under that venv's
Python with ``--inner dht|expert`` for the hivemind side, which imports hivemind and nothing of
dmoe except ``services/expert/layers.py`` loaded by path (torch only), so both serve the same
module.

The hivemind side drives hivemind's public API in the shape of hivemind's
``benchmarks/benchmark_dht.py`` and ``benchmark_throughput.py`` with our parameters:

- DHT (``benchmarks/dht.py --mode a``): 16 ``hivemind.DHT`` peers (each its own process with
  its own p2pd daemon), each bootstrapped from 4 random earlier peers; 10 concurrent tasks x
  16 rounds; per round 8 random surviving peers store one subkey each under a fresh key
  (``latest`` gets), then 8 random surviving peers get it; a get succeeds only with every
  stored subkey and value. 2 of the 16 peers (ours: ``round(16 x 0.1)``; hivemind's script
  takes ``int()``, 1) are SIGKILLed (the DHT process and its p2pd) after random rounds, as ours
  are; hivemind's script calls ``shutdown()`` instead. hivemind's records are plain (its
  benchmark has no validators); ours are signed by default (more CPU for ours).
- Expert throughput (``benchmarks/expert_throughput.py --backward``): one ``hivemind.moe.Server``
  with 4 experts of hidden 256, Adam, ``max_batch_size`` 4 x batch and ``clients // 2``
  connection handlers (hivemind's defaults), 8 client processes each with its own ``P2P`` and
  ``RemoteExpert`` per expert, 32 batches of 64 rows, forward then ``out.sum().backward()``.
  As ours (and unlike hivemind's script, which times from server start and includes the
  clients' p2pd start-up), clients first call every expert once, then all start together and
  the time runs from that start to the last client's end. The module is our ``ffn``
  (``--hivemind-expert dmoe_ffn``, default: the same compute on both sides) or hivemind's own
  lighter ``ffn`` (``--hivemind-expert ffn``, h->4h->h, what hivemind's script serves), not
  TorchScript-compiled (hivemind's script compiles it). CPU of every process involved (the
  server process and its handler, DHT and p2pd processes; clients and their p2pd) is read
  from /proc, so hivemind's samples per CPU-second can be set against the local compute of
  the paired dmoe run (same module) like our ``cpu_efficiency``.

Prints a table; with ``--json`` the last line is one JSON object (per-run figures, ratios,
targets). Each invocation also writes that object, with the raw outputs of every run, to
``benchmarks/out/hivemind-baseline-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from hivemind_venv import OUT, ROOT, hivemind_sockets, remove_stale_sockets, venv_python
from proc import cpu_seconds, descendants, tree_cpu

# issue 12: dmoe's mean store and get each this many times faster than hivemind's
DHT_TARGET = 6.0
EXPERT_TARGET = 3.0  # samples/s against hivemind's
CPU_EFFICIENCY_TARGET = 0.70
# what the report keeps of each run (the full outputs go to the file under benchmarks/out/)
DHT_FIELDS = (
    "mean_store_s", "mean_get_s", "store_success", "get_success", "cpu_s_per_op", "killed",
    "load_average_1m",
)  # fmt: skip
EXPERT_FIELDS = (
    "samples_per_s", "cpu_efficiency", "local_limit_samples_per_s", "ratio", "cpu_us_per_sample",
)  # fmt: skip


# ---------------------------------------------------------------- hivemind side: DHT
async def hivemind_dht(args: argparse.Namespace) -> dict[str, Any]:
    import hivemind
    from hivemind.utils.timed_storage import get_dht_time

    rng = random.Random(args.seed)
    peers: list[hivemind.DHT] = []
    started = time.monotonic()
    for i in range(args.peers):
        initial = [a for p in rng.sample(peers, min(4, i)) for a in p.get_visible_maddrs()]
        peers.append(hivemind.DHT(initial_peers=initial, start=True, wait_timeout=5))
    startup_s = time.monotonic() - started
    n_kill = max(1, round(args.peers * args.kill_fraction))
    victims = set(rng.sample(range(args.peers), n_kill))
    survivors = [i for i in range(args.peers) if i not in victims]
    total_rounds = args.tasks * args.rounds
    kill_at = {v: rng.randrange(1, total_rounds) for v in victims}
    store_times: list[float] = []
    get_times: list[float] = []
    counts = {"stores": 0, "stores_ok": 0, "gets": 0, "gets_ok": 0, "rounds": 0}
    cpu_end: dict[int, float] = {}
    failures: list[str] = []

    def kill(victim: int) -> None:
        pids = [peers[victim].pid, *descendants(peers[victim].pid)]  # the DHT and its p2pd
        cpu_end[victim] = sum(cpu_seconds(p) for p in pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    async def task() -> None:
        for _ in range(args.rounds):
            key = uuid.uuid4().hex
            writers = rng.sample(survivors, args.store_peers)
            values = {uuid.uuid4().hex: uuid.uuid4().hex for _ in writers}
            expiration = get_dht_time() + args.expiration
            t0 = time.perf_counter()
            stored = await asyncio.gather(
                *(
                    peers[w].store(key, v, expiration, subkey=sk, return_future=True)
                    for w, (sk, v) in zip(writers, values.items(), strict=True)
                ),
                return_exceptions=True,
            )
            store_times.append(time.perf_counter() - t0)
            counts["stores"] += len(stored)
            counts["stores_ok"] += sum(1 for r in stored if r is True)
            failures.extend(f"store: {r!r}"[:200] for r in stored if r is not True)
            readers = rng.sample(survivors, args.get_peers)
            t0 = time.perf_counter()
            found = await asyncio.gather(
                *(peers[r].get(key, latest=True, return_future=True) for r in readers),
                return_exceptions=True,
            )
            get_times.append(time.perf_counter() - t0)
            for answer in found:
                counts["gets"] += 1
                got = getattr(answer, "value", None)
                if isinstance(got, dict) and all(
                    sk in got and got[sk].value == v for sk, v in values.items()
                ):
                    counts["gets_ok"] += 1
                else:
                    seen = len(got) if isinstance(got, dict) else repr(answer)[:150]
                    failures.append(f"get: {seen} of {len(values)} subkeys")
            counts["rounds"] += 1
            for victim, at in kill_at.items():
                if at == counts["rounds"] and victim not in cpu_end:
                    kill(victim)

    peer_pids = [p.pid for p in peers]
    cpu_start = [tree_cpu(p) for p in peer_pids]
    self_start = time.process_time()
    t_run = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(args.tasks)))
    run_s = time.perf_counter() - t_run
    cpu_now = [cpu_end.get(i, tree_cpu(p)) for i, p in enumerate(peer_pids)]
    cpu_s = time.process_time() - self_start + sum(cpu_now) - sum(cpu_start)
    for i in survivors:
        peers[i].shutdown()
    for i in victims:
        peers[i].join(timeout=5)
    ops = counts["stores"] + counts["gets"]
    return {
        "peers": args.peers,
        "tasks": args.tasks,
        "rounds": args.rounds,
        "killed": len(cpu_end),
        "signed": False,
        "mean_store_s": statistics.mean(store_times),
        "mean_get_s": statistics.mean(get_times),
        "store_success": counts["stores_ok"] / max(counts["stores"], 1),
        "get_success": counts["gets_ok"] / max(counts["gets"], 1),
        "stores": counts["stores"],
        "gets": counts["gets"],
        "startup_s": startup_s,
        "run_s": run_s,
        "cpu_s": cpu_s,
        "cpu_s_per_op": cpu_s / max(ops, 1),
        "load_average_1m": os.getloadavg()[0],
        "failures": sorted(set(failures))[:10],
    }


# ---------------------------------------------------------------- hivemind side: experts
def _load_dmoe_ffn(hidden: int) -> Any:
    """Our ``ffn`` module, from ``services/expert/layers.py`` loaded by path (torch only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "dmoe_layers", ROOT / "services" / "expert" / "layers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dmoe_layers"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module.get_expert_class("ffn").build(hidden)


def _hivemind_client(
    index: int,
    maddrs: list[Any],
    peer_id: Any,
    args: argparse.Namespace,
    ready: Any,
    go: Any,
    finish: Any,
    results: Any,
) -> None:
    import torch
    from hivemind.moe.client.expert import RemoteExpert
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from hivemind.moe.expert_uid import ExpertInfo
    from hivemind.p2p import P2P

    torch.set_num_threads(1)
    p2p = RemoteExpertWorker.run_coroutine(P2P.create(initial_peers=maddrs))
    experts = [
        RemoteExpert(ExpertInfo(uid=f"expert.{i}", peer_id=peer_id), p2p)
        for i in range(args.experts)
    ]
    rng = random.Random(index)

    def call(expert: Any) -> None:
        out = expert(torch.randn(args.batch_size, args.hidden_dim))
        if args.backward:
            out.sum().backward()

    for expert in experts:  # warm-up: connections, first-call costs
        call(expert)
    ready.wait()
    go.wait()
    me = os.getpid()
    cpu, started = tree_cpu(me), time.perf_counter()
    for _ in range(args.batches_per_client):
        call(rng.choice(experts))
    end = time.perf_counter()
    samples = args.batches_per_client * args.batch_size
    results.put((index, started, end, samples, tree_cpu(me) - cpu))
    finish.wait()
    RemoteExpertWorker.run_coroutine(p2p.shutdown())


def hivemind_expert(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from hivemind.dht import DHT
    from hivemind.moe.server import ModuleBackend, Server
    from hivemind.moe.server.layers import name_to_block
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    ctx = mp.get_context("spawn")
    ready, go, finish = ctx.Barrier(args.clients + 1), ctx.Event(), ctx.Event()
    results = ctx.Queue()
    dht = DHT(start=True)
    backends = {}
    for i in range(args.experts):
        if args.hivemind_expert == "dmoe_ffn":
            module = _load_dmoe_ffn(args.hidden_dim)
        else:
            module = name_to_block[args.hivemind_expert](args.hidden_dim)
        backends[f"expert.{i}"] = ModuleBackend(
            name=f"expert.{i}",
            module=module,
            optimizer=torch.optim.Adam(module.parameters()),
            args_schema=(BatchTensorDescriptor(args.hidden_dim),),
            outputs_schema=BatchTensorDescriptor(args.hidden_dim),
            max_batch_size=4 * args.batch_size,
        )
    server = Server(dht, backends, num_connection_handlers=max(1, args.clients // 2), device="cpu")
    server.start()
    server.ready.wait()
    clients = [
        ctx.Process(
            target=_hivemind_client,
            args=(i, dht.get_visible_maddrs(), dht.peer_id, args, ready, go, finish, results),
            daemon=True,
        )
        for i in range(args.clients)
    ]
    try:
        for client in clients:
            client.start()
        ready.wait(timeout=600)
        client_pids = frozenset(c.pid for c in clients if c.pid is not None)
        server_cpu = tree_cpu(os.getpid(), exclude=client_pids)
        start = time.perf_counter()
        go.set()
        done = [results.get(timeout=600) for _ in clients]
        server_cpu = tree_cpu(os.getpid(), exclude=client_pids) - server_cpu
        finish.set()
        for client in clients:
            client.join(timeout=30)
    finally:
        for client in clients:
            if client.is_alive():
                client.terminate()
        server.shutdown()
        server.join(timeout=30)
        dht.shutdown()
    elapsed = max(end for _, _, end, _, _ in done) - start
    samples = sum(n for *_, n, _ in done)
    client_cpu = sum(c for *_, c in done)
    return {
        "expert": args.hivemind_expert,
        "backward": args.backward,
        "samples_per_s": round(samples / elapsed, 1),
        "samples": samples,
        "elapsed_s": round(elapsed, 3),
        "experts": args.experts,
        "clients": args.clients,
        "batch_size": args.batch_size,
        "connection_handlers": max(1, args.clients // 2),
        "server_cpu_s_per_s": round(server_cpu / elapsed, 2),
        "clients_cpu_s_per_s": round(client_cpu / elapsed, 2),
        "samples_per_cpu_s": round(samples / (server_cpu + client_cpu), 1),
        "cpu_us_per_sample": {
            "server": round(1e6 * server_cpu / samples, 1),
            "clients": round(1e6 * client_cpu / samples, 1),
        },
    }


# ---------------------------------------------------------------- both, interleaved
def _last_json(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` from the repository root, its output kept in ``log``; its last line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sockets_before = hivemind_sockets()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    finally:  # hivemind's p2p clients leave their socket files in /tmp
        remove_stale_sockets(hivemind_sockets() - sockets_before)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"{cmd[1:4]} failed ({proc.returncode}), see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _span(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def compare_dht(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = []
    for o, t in zip(ours, theirs, strict=True):
        runs.append(
            {
                "ours": {k: o[k] for k in (*DHT_FIELDS, "signed")},
                "hivemind": {k: t[k] for k in DHT_FIELDS},
                "store_ratio": t["mean_store_s"] / o["mean_store_s"],
                "get_ratio": t["mean_get_s"] / o["mean_get_s"],
                "cpu_per_op_ratio": t["cpu_s_per_op"] / o["cpu_s_per_op"],
            }
        )
    store_ratio = statistics.mean(t["mean_store_s"] for t in theirs) / statistics.mean(
        o["mean_store_s"] for o in ours
    )
    get_ratio = statistics.mean(t["mean_get_s"] for t in theirs) / statistics.mean(
        o["mean_get_s"] for o in ours
    )
    full = all(o["store_success"] == 1.0 and o["get_success"] == 1.0 for o in ours)
    return {
        "runs": runs,
        "store_ratio_of_means": store_ratio,
        "get_ratio_of_means": get_ratio,
        "ours_full_success": full,
        "target_met": store_ratio >= DHT_TARGET and get_ratio >= DHT_TARGET and full,
    }


def compare_expert(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    runs = []
    for o, t in zip(ours, theirs, strict=True):
        run = {
            "ours": {k: o[k] for k in EXPERT_FIELDS},
            "hivemind": t,
            "samples_ratio": o["samples_per_s"] / t["samples_per_s"],
        }
        if t["expert"] == "dmoe_ffn":  # same module: our local run is hivemind's limit too
            per_cpu_s = 1e6 / o["cpu_us_per_sample"]["local"]
            run["hivemind_cpu_efficiency"] = t["samples_per_cpu_s"] / per_cpu_s
            run["hivemind_ratio_vs_local_limit"] = (
                t["samples_per_s"] / o["local_limit_samples_per_s"]
            )
        runs.append(run)
    samples_ratio = statistics.mean(o["samples_per_s"] for o in ours) / statistics.mean(
        t["samples_per_s"] for t in theirs
    )
    efficiency = [o["cpu_efficiency"] for o in ours]
    return {
        "runs": runs,
        "samples_ratio_of_means": samples_ratio,
        "ours_cpu_efficiency_mean": statistics.mean(efficiency),
        "target_met": samples_ratio >= EXPERT_TARGET and min(efficiency) >= CPU_EFFICIENCY_TARGET,
    }


def print_dht(result: dict[str, Any]) -> None:
    print("DHT mode A, 16 peers (dmoe: benchmarks/dht.py --mode a; hivemind 1.1.12 driver)")
    print("run | dmoe store / get s | success | CPU-s/op | hivemind store / get s | success "
          "| CPU-s/op | store x | get x")  # fmt: skip
    for i, run in enumerate(result["runs"], 1):
        o, t = run["ours"], run["hivemind"]
        print(
            f"{i} | {o['mean_store_s']:.3f} / {o['mean_get_s']:.3f} | "
            f"{o['store_success']:.0%} / {o['get_success']:.0%} | {o['cpu_s_per_op']:.4f} | "
            f"{t['mean_store_s']:.3f} / {t['mean_get_s']:.3f} | "
            f"{t['store_success']:.1%} / {t['get_success']:.1%} | {t['cpu_s_per_op']:.4f} | "
            f"{run['store_ratio']:.2f} | {run['get_ratio']:.2f}"
        )
    print(
        f"ratio of means: store {result['store_ratio_of_means']:.2f}x, get "
        f"{result['get_ratio_of_means']:.2f}x (target {DHT_TARGET:g}x each, 100% success): "
        f"{'met' if result['target_met'] else 'NOT met'}"
    )


def print_expert(result: dict[str, Any]) -> None:
    print("Expert throughput (dmoe: benchmarks/expert_throughput.py; hivemind 1.1.12 driver)")
    print("run | dmoe samples/s | cpu_efficiency | hivemind samples/s | hivemind per CPU-s "
          "(vs local) | dmoe / hivemind")  # fmt: skip
    for i, run in enumerate(result["runs"], 1):
        o, t = run["ours"], run["hivemind"]
        vs_local = run.get("hivemind_cpu_efficiency")
        print(
            f"{i} | {o['samples_per_s']:,.0f} | {o['cpu_efficiency']:.3f} | "
            f"{t['samples_per_s']:,.0f} ({t['expert']}) | {t['samples_per_cpu_s']:,.0f} "
            f"({'-' if vs_local is None else f'{vs_local:.3f}'}) | {run['samples_ratio']:.2f}"
        )
    print(
        f"ratio of means {result['samples_ratio_of_means']:.2f}x (target {EXPERT_TARGET:g}x), "
        f"dmoe cpu_efficiency {result['ours_cpu_efficiency_mean']:.3f} mean (target "
        f"{CPU_EFFICIENCY_TARGET:g}): {'met' if result['target_met'] else 'NOT met'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=["dht", "expert", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3, help="interleaved pairs per benchmark")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--setup-only", action="store_true", help="make the venv and stop")
    parser.add_argument("--pip-args", default="", help="extra pip flags for the venv install")
    parser.add_argument("--hivemind-expert", choices=["dmoe_ffn", "ffn"], default="dmoe_ffn")
    parser.add_argument("--expert-args", default="", help="extra flags for our expert benchmark")
    parser.add_argument("--inner", choices=["dht", "expert"], help=argparse.SUPPRESS)
    # the hivemind side's shape; the defaults are those of dht.py --mode a / expert_throughput
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    for name, default in (
        ("peers", 16), ("tasks", 10), ("rounds", 16), ("store-peers", 8), ("get-peers", 8),
        ("experts", 4), ("hidden-dim", 256), ("clients", 8), ("batch-size", 64),
        ("batches-per-client", 32),
    ):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default, help=argparse.SUPPRESS)
    parser.add_argument("--kill-fraction", type=float, default=0.1, help=argparse.SUPPRESS)
    parser.add_argument("--expiration", type=float, default=300.0, help=argparse.SUPPRESS)
    parser.set_defaults(backward=True)  # only the --backward shape is compared
    args = parser.parse_args()

    if args.inner == "dht":
        print(json.dumps(asyncio.run(hivemind_dht(args))), flush=True)
        os._exit(0)  # hivemind's background threads of killed peers would hold the exit
    if args.inner == "expert":
        print(json.dumps(hivemind_expert(args)), flush=True)
        os._exit(0)

    OUT.mkdir(parents=True, exist_ok=True)
    python = str(venv_python(args.pip_args))
    if args.setup_only:
        print(python)
        return 0
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    me = str(Path(__file__).resolve())
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": os.getloadavg(),
        "cores": len(os.sched_getaffinity(0)),
    }
    raw: dict[str, Any] = {}
    path = OUT / f"hivemind-baseline-{stamp}.json"
    for what in ("dht", "expert") if args.what == "both" else (args.what,):
        ours, theirs = [], []
        for i in range(args.runs):
            if what == "dht":
                ours_cmd = [sys.executable, "benchmarks/dht.py", "--mode", "a", "--json"]
                ours_cmd += ["--seed", str(i)]
                theirs_cmd = [python, me, "--inner", "dht", "--seed", str(i)]
            else:
                ours_cmd = [sys.executable, "benchmarks/expert_throughput.py", "--backward"]
                ours_cmd += ["--json", *args.expert_args.split()]
                theirs_cmd = [python, me, "--inner", "expert"]
                theirs_cmd += ["--hivemind-expert", args.hivemind_expert]
            try:  # a failed run drops its pair, not the runs already made
                pair = [
                    _last_json(cmd, OUT / f"hivemind-baseline-{stamp}-{what}-{i}-{side}.log")
                    for cmd, side in ((ours_cmd, "dmoe"), (theirs_cmd, "hivemind"))
                ]
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                report.setdefault("failed", []).append(f"{what} pair {i + 1}: {e}"[:300])
                print(f"{what} pair {i + 1} failed: {e}", file=sys.stderr, flush=True)
                continue
            ours.append(pair[0])
            theirs.append(pair[1])
            raw[what] = {"dmoe": ours, "hivemind": theirs}
            path.write_text(json.dumps({**report, "raw": raw}, indent=1))  # so far
            print(f"{what} pair {i + 1}/{args.runs} done", file=sys.stderr, flush=True)
        if not ours:
            continue
        report[what] = compare_dht(ours, theirs) if what == "dht" else compare_expert(ours, theirs)
    report["load_average_after"] = os.getloadavg()
    for what, show in (("dht", print_dht), ("expert", print_expert)):
        if what in report:
            show(report[what])
    print(f"load average before {report['load_average_before']}, after "
          f"{report['load_average_after']}")  # fmt: skip
    path.write_text(json.dumps({**report, "raw": raw}, indent=1))
    print(f"full results: {path}")
    if args.json:
        print(json.dumps(report))
    return 1 if report.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
