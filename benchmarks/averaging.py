"""Averaging benchmark: ``python benchmarks/averaging.py [--json]`` (issue 17).

The workload of hivemind's ``benchmarks/benchmark_averaging.py``: ``--peers`` 16 averaging
peers, ``--target-group-size`` 4, ``--rounds`` 5, the 13 tensors per layer of
``--hid-size 256 --num-layers 3`` (2.4 M float32 values) averaged with float16 on the wire. Each
of our peers is its own process (``benchmarks/averaging_peer.py``: numpy + grpc, no torch)
talking real gRPC on 127.0.0.1, with ``--dht-nodes`` DHT node processes. Reported:

- ``wall_s``: from the common start signal until every peer finished its rounds;
- ``success_rate``: rounds that averaged with at least one other peer, over peers x rounds;
- ``mean_group_size``: mean group of the successful rounds;
- ``max_abs_error``: the largest difference between a peer's result and the exact weighted mean
  of the inputs its result holds (each peer can compute every peer's inputs);
- ``cpu_s``: CPU of every peer and DHT node from the start signal to the peer's last round
  (``cpu_with_startup_s`` adds process start-up and imports; ``startup_s``: until every peer
  served), as hivemind's side counts them.

With hivemind 1.1.12 available (``benchmarks/hivemind_averaging.py``, its own venv), the runs
alternate ours, hivemind's, ours, ... in the same invocation (``--runs`` pairs); ``--no-hivemind``
runs ours only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from proc import cpu_seconds, free_ports, stop  # noqa: E402

sys.path.insert(0, str(ROOT))
from services.averaging.matchmaking import next_slot  # noqa: E402
from services.averaging.rounds import AveragerConfig  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_dht(count: int, workdir: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    ports = free_ports(count)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    procs = []
    for i, port in enumerate(ports):
        cmd = [
            sys.executable, "-m", "services.dht", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "-1", "--log-level", "warning", "--shutdown-grace", "0.5",
            "--identity-file", str(workdir / f"dht-{i}.key"),
        ]  # fmt: skip
        if i:
            cmd += ["--initial-peers", addresses[0]]
        log = open(workdir / f"dht-{i}.log", "wb")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=log))
    from services.common.healthcheck import wait_serving

    for address, proc in zip(addresses, procs, strict=True):
        if not wait_serving(address, 120, alive=lambda p=proc: p.poll() is None):
            raise RuntimeError(f"DHT node {address} did not start (see {workdir})")
    return procs, addresses


def run_ours(args: argparse.Namespace, workdir: Path, extra: list[str] | None = None,
             hostile: dict[int, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """One run of our averager; the figures the issue asks for, plus per-peer reports."""
    workdir.mkdir(parents=True, exist_ok=True)
    dht, addresses = start_dht(args.dht_nodes, workdir)
    go = workdir / "go"
    go.unlink(missing_ok=True)
    peers: list[subprocess.Popen[bytes]] = []
    outs = [workdir / f"peer-{i}.json" for i in range(args.peers)]
    launched = time.monotonic()
    try:
        for i in range(args.peers):
            outs[i].unlink(missing_ok=True)
            cmd = [
                sys.executable, str(ROOT / "benchmarks" / "averaging_peer.py"),
                "--initial-peers", ",".join(addresses), "--index", str(i),
                "--peers", str(args.peers), "--rounds", str(args.rounds),
                "--hid-size", str(args.hid_size), "--num-layers", str(args.num_layers),
                "--size", str(args.size), "--target-group-size", str(args.target_group_size),
                "--window", str(args.window), "--compression", args.compression,
                "--go-file", str(go), "--out", str(outs[i]), *(extra or []),
            ]  # fmt: skip
            if hostile and i in hostile:
                cmd += ["--hostile", hostile[i]]
            log = open(workdir / f"peer-{i}.log", "wb")  # noqa: SIM115
            peers.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=log))
        deadline = time.monotonic() + args.timeout
        while not all(Path(str(o) + ".ready").exists() for o in outs):
            dead = [i for i, p in enumerate(peers) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"peers {dead} exited before serving (see {workdir})")
            time.sleep(0.05)
        startup_s = time.monotonic() - launched
        dht_cpu0 = sum(cpu_seconds(p.pid) for p in dht)
        # the first round's slot, named for all: the first one still open 0.5 s from now
        first = next_slot(time.time() + 0.5, args.window, AveragerConfig(run_id="x").lead)
        tmp = go.with_suffix(".tmp")
        tmp.write_text(json.dumps({"first_slot": first}))
        os.replace(tmp, go)
        started = time.monotonic()
        for p in peers:
            p.wait(max(1.0, deadline - time.monotonic()))
        dht_cpu = sum(cpu_seconds(p.pid) for p in dht) - dht_cpu0
    finally:
        stop(peers, grace=5.0)
        stop(dht, grace=5.0)
    reports = [json.loads(o.read_text()) for o in outs if o.exists()]
    rounds = [r for rep in reports for r in rep["rounds"]]
    ok = [r for r in rounds if r["outcome"] == "ok"]
    expected = args.peers * args.rounds
    return {
        "system": "dmoe",
        "wall_s": round(max((r["wall_s"] for r in reports), default=time.monotonic() - started), 3),
        "success_rate": round(len(ok) / expected, 4) if expected else 0.0,
        "mean_group_size": round(sum(len(r["group"]) for r in ok) / len(ok), 3) if ok else 0.0,
        "max_abs_error": max((r.get("max_abs_error", 0.0) for r in ok), default=0.0),
        "cpu_s": round(sum(rep["cpu_s"] for rep in reports) + dht_cpu, 2),
        "cpu_with_startup_s": round(
            sum(rep["cpu_with_startup_s"] for rep in reports) + dht_cpu + dht_cpu0, 2
        ),
        "startup_s": round(startup_s, 2),
        "peers_reported": len(reports),
        "outcomes": {o: sum(r["outcome"] == o for r in rounds) for o in ("ok", "alone", "failed")},
        "reports": reports,
    }  # fmt: skip


def run_hivemind_side(args: argparse.Namespace, workdir: Path) -> dict[str, Any] | None:
    try:
        from hivemind_averaging import run_hivemind  # type: ignore[import-not-found]
    except ImportError as exc:
        print(f"hivemind side unavailable: {exc}", file=sys.stderr)
        return None
    result = run_hivemind(
        peers=args.peers, target_group_size=args.target_group_size, rounds=args.rounds,
        hid_size=args.hid_size, num_layers=args.num_layers, out_dir=workdir,
    )  # fmt: skip
    return {**result, "system": "hivemind", "label": result.get("system", "hivemind")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="dmoe averaging vs hivemind 1.1.12")
    p.add_argument("--peers", type=int, default=16)
    p.add_argument("--target-group-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hid-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--size", type=int, default=0, help="flat vector size instead of the layers")
    p.add_argument("--compression", choices=["none", "float16"], default="float16")
    p.add_argument("--window", type=float, default=2.0, help="matchmaking slot, seconds")
    p.add_argument("--dht-nodes", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="pairs (ours, hivemind's) to run")
    p.add_argument("--no-hivemind", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "averaging"))
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for i in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix=f"ours-{i}-", dir=out))
        ours = run_ours(args, work)
        ours.pop("reports")
        shutil.rmtree(work, ignore_errors=True)
        runs.append(ours)
        print(f"dmoe     run {i}: {ours['wall_s']:.1f} s, success {ours['success_rate']:.2%}, "
              f"group {ours['mean_group_size']:.2f}, max error {ours['max_abs_error']:.2e}, "
              f"CPU {ours['cpu_s']:.1f} s")  # fmt: skip
        if not args.no_hivemind:
            theirs = run_hivemind_side(args, out / f"hivemind-{i}")
            if theirs is not None:
                runs.append(theirs)
                print(
                    f"hivemind run {i}: {theirs['wall_s']:.1f} s, success "
                    f"{theirs['success_rate']:.2%}, group {theirs['mean_group_size']:.2f}, "
                    f"max error {theirs['max_abs_error']:.2e}, CPU {theirs['cpu_s']:.1f} s"
                )
    ours_runs = [r for r in runs if r["system"] == "dmoe"]
    theirs_runs = [r for r in runs if r["system"] == "hivemind"]
    report: dict[str, Any] = {
        "peers": args.peers, "target_group_size": args.target_group_size,
        "rounds": args.rounds, "hid_size": args.hid_size, "num_layers": args.num_layers,
        "compression": args.compression, "window": args.window, "runs": runs,
        "load_average": os.getloadavg()[0],
    }  # fmt: skip
    for key in ("wall_s", "success_rate", "mean_group_size", "max_abs_error", "cpu_s"):
        report[key] = sum(r[key] for r in ours_runs) / len(ours_runs)
    if theirs_runs:
        report["hivemind"] = {
            key: sum(r[key] for r in theirs_runs) / len(theirs_runs)
            for key in ("wall_s", "success_rate", "mean_group_size", "max_abs_error", "cpu_s")
        }
        report["wall_ratio"] = report["hivemind"]["wall_s"] / report["wall_s"]
        print(f"hivemind / dmoe wall time: {report['wall_ratio']:.2f}x")
    (out / "averaging.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
