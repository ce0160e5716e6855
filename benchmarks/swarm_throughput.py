"""Swarm training throughput and where the CPU goes: the convergence benchmark's 0 ms swarm.

Starts one DHT node, ``--servers`` expert servers hosting a ``--layers`` x ``--grid`` DMoE and
``--trainers`` averaging trainers (batch ``--batch-size``, no evaluation), lets them warm up,
then measures over ``--seconds``: updates/s (the sum of the trainers' steps), samples/s, and
the CPU budget of one update: CPU milliseconds per update of the DHT, the expert servers and the
trainers (from /proc), the expert calls per update, and how much of the servers' CPU is the
experts' own compute (``dmoe_expert_compute_seconds``: forward, backward, optimizer) against
the rest (RPC, (de)serialization, batching, Python). On ``C`` cores the machine cannot exceed
``1000 C / (CPU ms per update)`` updates/s: the ceiling this budget sets.

    python benchmarks/swarm_throughput.py                      # 8 trainers, 60 s, Fashion-MNIST
    python benchmarks/swarm_throughput.py --dataset digits --trainers 2 --seconds 5 --warmup 3 \\
        --json                                                 # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from proc import cpu_seconds, free_ports, stop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convergence import layer_uids, scrape, spawn, subset_idx, wait_healthy  # noqa: E402

from scripts.fetch_dataset import DEFAULT_DEST, fetch  # noqa: E402

SERIES = re.compile(r"^(dmoe_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$")


def totals(text: str, names: set[str]) -> dict[str, float]:
    """Each named series summed over its labels."""
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if (m := SERIES.match(line)) and m.group(1) in names:
            out[m.group(1)] += float(m.group(3))
    return out


EXPERT = {"dmoe_expert_compute_seconds_sum", "dmoe_expert_requests_total"}
TRAINER = {"dmoe_trainer_steps_total"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--k-best", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--average", default="true", help="trainers average (as in the runs)")
    parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    parser.add_argument("--warmup", type=float, default=20.0, help="s before measuring")
    parser.add_argument("--seconds", type=float, default=60.0, help="s measured")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "throughput")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data = ["--dataset", "digits"]
    if args.dataset == "fashion-mnist":
        path = subset_idx(fetch(DEFAULT_DEST), args.out / "data" / "fashion-mnist-idx")
        data = ["--dataset", "mnist", "--data-path", str(path)]
    procs: dict[str, object] = {}
    load_start = os.getloadavg()[0]
    try:
        dht, dht_address = spawn(["services.dht", "--metrics-port", "-1"], logs / "dht.log")
        procs["dht"] = dht
        wait_healthy(dht, dht_address, logs / "dht.log")
        uids = [u for layer in layer_uids("tp", args.layers, args.grid) for u in layer]
        expert_ports = free_ports(args.servers)
        started = []
        for s in range(args.servers):
            proc, address = spawn(
                ["services.expert", "--experts", ",".join(uids[s :: args.servers]),
                 "--hidden-dim", str(args.hidden_dim), "--dht-peers", dht_address,
                 "--compute-threads", "1", "--metrics-port", str(expert_ports[s])],
                logs / f"expert{s}.log",
            )  # fmt: skip
            procs[f"expert{s}"] = proc
            started.append((proc, address, logs / f"expert{s}.log"))
        for proc, address, log in started:
            wait_healthy(proc, address, log)
        trainer_ports = free_ports(args.trainers)
        started = []
        for t in range(args.trainers):
            proc, address = spawn(
                ["services.trainer", "--initial-peers", dht_address, "--uid-prefix", "tp",
                 "--grid", str(args.grid), "--k-best", str(args.k_best),
                 "--hidden-dim", str(args.hidden_dim), "--num-layers", str(args.layers),
                 "--final-norm", "true", *data, "--batch-size", str(args.batch_size),
                 "--seed", str(t), "--steps", "0", "--eval-every", "0",
                 "--average", args.average, "--run-id", "throughput",
                 "--log-format", "json", "--metrics-port", str(trainer_ports[t])],
                logs / f"trainer{t}.log",
            )  # fmt: skip
            procs[f"trainer{t}"] = proc
            started.append((proc, address, logs / f"trainer{t}.log"))
        for proc, address, log in started:
            wait_healthy(proc, address, log)
        time.sleep(args.warmup)

        def sample() -> tuple[float, dict[str, float], dict[str, float], dict[str, float]]:
            cpu = {name: cpu_seconds(p.pid) for name, p in procs.items()}  # type: ignore[attr-defined]
            expert = totals("".join(scrape(p) for p in expert_ports), EXPERT)
            trainer = totals("".join(scrape(p) for p in trainer_ports), TRAINER)
            return time.monotonic(), cpu, expert, trainer

        t0, cpu0, e0, s0 = sample()
        time.sleep(args.seconds)
        t1, cpu1, e1, s1 = sample()
    finally:
        stop(list(procs.values())[::-1])  # type: ignore[arg-type]
    span = t1 - t0
    updates = s1["dmoe_trainer_steps_total"] - s0["dmoe_trainer_steps_total"]
    per = max(1.0, updates)
    role = {"dht": 0.0, "expert servers": 0.0, "trainers": 0.0}
    for name in cpu0:
        key = (
            "dht"
            if name == "dht"
            else "expert servers"
            if name.startswith("expert")
            else "trainers"
        )
        role[key] += cpu1[name] - cpu0[name]
    total_cpu = sum(role.values())
    compute = e1["dmoe_expert_compute_seconds_sum"] - e0["dmoe_expert_compute_seconds_sum"]
    calls = e1["dmoe_expert_requests_total"] - e0["dmoe_expert_requests_total"]
    cores = os.cpu_count() or 1
    report = {
        "trainers": args.trainers,
        "batch_size": args.batch_size,
        "servers": args.servers,
        "seconds": round(span, 1),
        "updates": int(updates),
        "updates_per_s": round(updates / span, 2),
        "samples_per_s": round(updates * args.batch_size / span, 1),
        "cpu_ms_per_update": {k: round(1000 * v / per, 2) for k, v in role.items()}
        | {"total": round(1000 * total_cpu / per, 2)},
        "cpu_share_of_machine": round(total_cpu / span / cores, 3),
        "expert_calls_per_update": round(calls / per, 1),
        "expert_compute_ms_per_update": round(1000 * compute / per, 2),
        "server_cpu_us_per_call_outside_compute": round(
            1e6 * (role["expert servers"] - compute) / max(1.0, calls), 1
        ),
        "trainer_cpu_us_per_call": round(1e6 * role["trainers"] / max(1.0, calls), 1),
        "ceiling_updates_per_s": round(1000 * cores / max(1e-9, 1000 * total_cpu / per), 1),
        "cores": cores,
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(report, indent=1))
    b = report["cpu_ms_per_update"]
    print(
        f"{args.trainers} trainers, batch {args.batch_size}: {report['updates_per_s']} updates/s, "
        f"{report['samples_per_s']} samples/s over {span:.0f} s "
        f"(machine {100 * report['cpu_share_of_machine']:.0f}% busy, "
        f"load {load_start:.1f} at start)\n"
        f"CPU per update: {b['total']} ms = trainers {b['trainers']} + expert servers "
        f"{b['expert servers']} (of which expert compute {report['expert_compute_ms_per_update']})"
        f" + DHT {b['dht']}\n"
        f"{report['expert_calls_per_update']} expert calls per update: "
        f"{report['server_cpu_us_per_call_outside_compute']} us of server CPU outside compute and "
        f"{report['trainer_cpu_us_per_call']} us of trainer CPU per call\n"
        f"ceiling on {cores} cores: {report['ceiling_updates_per_s']} updates/s"
    )
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
