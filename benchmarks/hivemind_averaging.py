"""hivemind 1.1.12's averaging, measured: ``python benchmarks/hivemind_averaging.py [--json]``.

Why: issue 17 compares dmoe's averager with hivemind's on the workload of hivemind's
``benchmarks/benchmark_averaging.py``, in the same run (``benchmarks/averaging.py`` alternates
the two and calls :func:`run_hivemind`). This file is the hivemind side; run alone it measures
hivemind only.

The workload (hivemind's script, its defaults; our own driver on hivemind's public API):

- a bootstrap ``hivemind.DHT``, then ``--peers`` peers started ``--spawn-dtime`` s apart, each a
  ``hivemind.DHT`` (its own process and p2pd daemon) and a
  ``hivemind.averaging.DecentralizedAverager`` (its own process, sharing that daemon) with
  ``Float16Compression``, ``target_group_size``, ``min_matchmaking_time`` 5 s,
  ``request_timeout`` 1 s and initial group bits ``index % num_groups`` (``num_groups`` the
  power of two nearest ``peers / target_group_size``); a thread of the driver per peer makes
  them and then calls ``step(timeout=round_timeout)`` ``--rounds`` times, as the script does.
- the averaged tensors: per layer the script's 13, for hidden size ``h``: ``[h, 3h]``, ``[3h]``,
  ``[3h]``, ``[h, h]``, ``[h]`` of ones, ``[h]`` of zeros, ``[h, 4h]``, ``[4h]``, ``[4h]`` of
  ones, ``[2, h, h, 2]``, ``[h]``, ``[h]``, ``[h]``; the others standard normal. 3 layers of 256:
  39 tensors, 2,373,888 floats (9.5 MB) per peer.

What differs from the script, and why:

- Inputs change every round, so each result can be checked. Before round ``r`` peer ``i`` loads
  input set ``(i + r) % peers`` of a pool of ``peers`` sets made once from fixed seeds (the
  script averages the same tensors again and again, so a wrong result would go unseen). Each
  peer gathers ``[index, round]`` through ``step(gather=...)``, which returns every group
  member's gathered value on success; from it the driver rebuilds the exact mean of the
  group's inputs and takes the largest absolute difference from the peer's result.
- A round succeeds when ``step`` returns a group of at least 2 (hivemind's ``min_group_size``);
  the script counts any non-``None`` return, which is the same thing. hivemind also returns
  the group when a reducer timed out and part of the vector kept the peer's own values (it
  logs ``Averaging: received 89.0% results``); ``rounds_off`` counts such rounds, whose result
  is off the group's mean beyond float16 rounding (``max_abs_error`` then shows ~4).
- The averagers are made from the driver's threads, as in the script; hivemind's
  ``run_in_background`` calls ``signal.signal``, which Python allows only in the main thread,
  so that call is skipped in other threads (it only makes the driver ignore Ctrl-C).
- By default every peer waits until all averagers are ready, then all start their rounds
  together, so ``wall_s`` (from that start to the last peer's last round) compares with dmoe's
  side, whose peers also start on one signal. ``--staggered`` (``together=False``) is the
  script's shape: each peer starts its rounds once it is ready and the clock runs from the
  first peer's start (the script's clock starts after spawning the peers, 1.6 s later).
  ``startup_s`` is the time until every averager was ready; ``wall_with_startup_s`` counts
  from the first peer's start in either mode.

``cpu_s`` is the CPU of every process involved over the ``wall_s`` window, read from /proc
before anything shuts down: the driver (its ``step`` calls and hivemind's background threads),
the DHT processes (the peers' and the bootstrap one), their p2pd daemons and the averager
processes, less the driver threads' own time loading inputs and checking results
(``check_cpu_s``: this benchmark's work, not hivemind's). ``cpu_with_startup_s`` adds the
start-up (forking the processes, starting p2pd, joining the DHT).

Prints a summary; with ``--json`` the last line is one JSON object. Each run writes the
hivemind side's log and its full output (every peer-round) to
``benchmarks/out/hivemind-averaging-<UTC time>.{log,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hivemind_venv import OUT, venv_python
from proc import cpu_seconds, descendants, tree_cpu

DEFAULTS = {
    "peers": 16, "target_group_size": 4, "rounds": 5, "hid_size": 256, "num_layers": 3,
    "min_matchmaking_time": 5.0, "round_timeout": 15.0, "request_timeout": 1.0,
    "spawn_dtime": 0.1,
}  # fmt: skip
# a result further than this from its group's exact mean was not (all) averaged: float16 on
# the way (the part sent, the mean of those, the delta returned) stays under 4 x 2**-11 x
# max|value|, about 0.011 for these standard normal inputs (3.4e-3 the most seen); a part left
# unaveraged is off by about max|value - mean| over that part (~4)
ERROR_TOLERANCE = 0.05
# the 13 tensors of one layer in hivemind's benchmark_averaging.py: shape in units of the
# hidden size (an int n stands for n * hid_size, a string for that literal number), and fill
SPEC_PER_LAYER: tuple[tuple[tuple[int | str, ...], str], ...] = (
    ((1, 3), "randn"), ((3,), "randn"), ((3,), "randn"), ((1, 1), "randn"), ((1,), "ones"),
    ((1,), "zeros"), ((1, 4), "randn"), ((4,), "randn"), ((4,), "ones"),
    (("2", 1, 1, "2"), "randn"), ((1,), "randn"), ((1,), "randn"), ((1,), "randn"),
)  # fmt: skip


# ---------------------------------------------------------------- pure helpers (both venvs)
def tensor_specs(hid_size: int, num_layers: int) -> list[tuple[tuple[int, ...], str]]:
    """(shape, fill) of every averaged tensor, in order: 13 per layer."""

    def dim(d: int | str) -> int:
        return int(d) if isinstance(d, str) else d * hid_size

    return [
        (tuple(dim(d) for d in shape), fill)
        for _ in range(num_layers)
        for shape, fill in SPEC_PER_LAYER
    ]


def group_bits(index: int, peers: int, target_group_size: int) -> str:
    """The initial group bits of peer ``index``: hivemind's script spreads the peers over the
    power of two of groups nearest ``peers / target_group_size``."""
    nbits = max(0, round(math.log2(max(peers / target_group_size, 1))))
    return format(index % 2**nbits, f"0{nbits}b") if nbits else ""


def input_key(index: int, round_: int, pool: int) -> int:
    """Which input set of the pool peer ``index`` averages in round ``round_``."""
    return (index + round_) % pool


def summarize(records: list[dict[str, Any]], peers: int, rounds: int) -> dict[str, Any]:
    """Success, group sizes and errors over every peer-round; a round a peer never reached
    (its thread died) counts as failed. ``rounds_off``: successful rounds whose result is not
    the group's mean within float16 rounding (:data:`ERROR_TOLERANCE`)."""
    ok = [r for r in records if r["ok"]]
    total = peers * rounds
    sizes = [r["group_size"] for r in ok]
    histogram: dict[str, int] = {}
    for size in sorted(sizes):
        histogram[str(size)] = histogram.get(str(size), 0) + 1
    return {
        "rounds_ok": len(ok),
        "rounds_total": total,
        "success_rate": len(ok) / total if total else 0.0,
        "mean_group_size": sum(sizes) / len(sizes) if sizes else 0.0,
        "group_sizes": histogram,
        "max_abs_error": max((r["error"] for r in ok), default=None),
        "rounds_off": sum(r["error"] > ERROR_TOLERANCE for r in ok),
    }


# ---------------------------------------------------------------- hivemind side (its venv)
def _allow_signal_only_in_main_thread() -> None:
    """hivemind's averager calls ``signal.signal`` while starting; from a thread that raises."""
    import signal

    original = signal.signal

    def guarded(signum: int, handler: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            return original(signum, handler)
        return signal.getsignal(signum)

    signal.signal = guarded  # type: ignore[assignment]


def hivemind_averaging(args: argparse.Namespace) -> dict[str, Any]:
    import hivemind
    import torch
    from hivemind.averaging import DecentralizedAverager
    from hivemind.compression import Float16Compression

    _allow_signal_only_in_main_thread()
    specs = tensor_specs(args.hid_size, args.num_layers)
    fills = {"ones": torch.ones, "zeros": torch.zeros}

    def input_set(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [
            torch.randn(shape, generator=gen) if fill == "randn" else fills[fill](shape)
            for shape, fill in specs
        ]

    pool = [input_set(1000 + k) for k in range(args.peers)]
    me = os.getpid()
    records: list[dict[str, Any]] = []
    ready_at: dict[int, float] = {}
    done_at: dict[int, float] = {}
    crashed: list[str] = []
    check_cpu = [0.0] * args.peers
    lock = threading.Condition()
    go = threading.Event()  # with --together: every averager is ready, rounds may start
    peers: list[tuple[Any, Any]] = []

    def settled() -> None:
        with lock:
            lock.notify_all()

    def run_peer(index: int, initial_peers: list[Any]) -> None:
        try:
            dht = hivemind.DHT(initial_peers=initial_peers, start=True)
            tensors = [t.clone() for t in pool[input_key(index, 0, args.peers)]]
            averager = DecentralizedAverager(
                tensors,
                dht,
                prefix="bench_averaging",
                initial_group_bits=group_bits(index, args.peers, args.target_group_size),
                compression=Float16Compression(),
                target_group_size=args.target_group_size,
                min_matchmaking_time=args.min_matchmaking_time,
                request_timeout=args.request_timeout,
                start=True,
            )
            with lock:
                peers.append((dht, averager))
                ready_at[index] = time.perf_counter()
            settled()
            if args.together:
                go.wait()
            for round_ in range(args.rounds):
                spent = time.thread_time()
                inputs = pool[input_key(index, round_, args.peers)]
                with averager.get_tensors() as mine:
                    for dst, src in zip(mine, inputs, strict=True):
                        dst.copy_(src)
                check_cpu[index] += time.thread_time() - spent
                t0 = time.perf_counter()
                try:
                    gathered = averager.step(gather=[index, round_], timeout=args.round_timeout)
                    failure = None if gathered else "step returned no group"
                except Exception as e:
                    gathered, failure = None, f"{type(e).__name__}: {e}"[:200]
                seconds = time.perf_counter() - t0
                record: dict[str, Any] = {
                    "peer": index, "round": round_, "seconds": round(seconds, 3),
                    "ok": bool(gathered) and len(gathered) >= 2,
                    "group_size": len(gathered) if gathered else 0, "failure": failure,
                }  # fmt: skip
                if record["ok"]:
                    spent = time.thread_time()
                    members = sorted(tuple(v) for v in gathered.values())
                    record["members"] = members
                    keys = [input_key(i, r, args.peers) for i, r in members]
                    with averager.get_tensors() as mine:
                        record["error"] = max(
                            (got - sum(pool[k][t] for k in keys) / len(keys)).abs().max().item()
                            for t, got in enumerate(mine)
                        )
                    check_cpu[index] += time.thread_time() - spent
                with lock:
                    records.append(record)
            done_at[index] = time.perf_counter()
        except Exception as e:  # a peer that could not start: its rounds count as failed
            crashed.append(f"peer {index}: {type(e).__name__}: {e}"[:300])
            done_at[index] = time.perf_counter()
            settled()

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    cpu_start = tree_cpu(me)
    root = hivemind.DHT(start=True)
    initial = root.get_visible_maddrs()
    threads = []
    for i in range(args.peers):
        thread = threading.Thread(target=run_peer, args=(i, initial), daemon=True)
        thread.start()
        threads.append(thread)
        time.sleep(args.spawn_dtime)
    with lock:
        lock.wait_for(lambda: len(ready_at) + len(crashed) >= args.peers, args.peer_timeout)
    all_ready = time.perf_counter()
    if args.together:
        began, cpu_began = all_ready, tree_cpu(me)
        go.set()
    else:  # hivemind's script: each peer starts its rounds once it is ready
        began, cpu_began = started, cpu_start
    for thread in threads:
        thread.join(timeout=args.peer_timeout)
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    end = time.perf_counter() if stuck else max(done_at.values(), default=time.perf_counter())
    cpu_end = tree_cpu(me)  # before anything shuts down: dead processes count 0
    driver_cpu = cpu_seconds(me)
    result = {
        "system": f"hivemind {hivemind.__version__}",
        "peers": args.peers,
        "target_group_size": args.target_group_size,
        "rounds": args.rounds,
        "hid_size": args.hid_size,
        "num_layers": args.num_layers,
        "tensors": len(specs),
        "floats_per_peer": sum(math.prod(s) for s, _ in specs),
        "compression": "float16",
        "min_matchmaking_time": args.min_matchmaking_time,
        "round_timeout": args.round_timeout,
        "request_timeout": args.request_timeout,
        "start": "together" if args.together else "staggered",
        "wall_s": round(end - began, 3),
        "startup_s": round(all_ready - started, 3),
        "wall_with_startup_s": round(end - started, 3),
        **summarize(records, args.peers, args.rounds),
        "cpu_s": round(cpu_end - cpu_began - sum(check_cpu), 2),
        "cpu_with_startup_s": round(cpu_end - cpu_start - sum(check_cpu), 2),
        "check_cpu_s": round(sum(check_cpu), 2),
        "driver_cpu_s": round(driver_cpu, 2),
        "processes": 1 + len(descendants(me)),
        "load_average_1m": os.getloadavg()[0],
        "load_average_1m_before": load_before,
        "crashed": crashed,
        "stuck": stuck,
        "failures": sorted({r["failure"] for r in records if r["failure"]})[:10],
        "records": sorted(records, key=lambda r: (r["peer"], r["round"])),
    }
    for dht, averager in peers:
        averager.shutdown()
        dht.shutdown()
    root.shutdown()
    return result


# ---------------------------------------------------------------- driver (any venv)
def run_hivemind(
    peers: int,
    target_group_size: int,
    rounds: int,
    hid_size: int,
    num_layers: int,
    out_dir: Path,
    *,
    min_matchmaking_time: float = DEFAULTS["min_matchmaking_time"],
    round_timeout: float = DEFAULTS["round_timeout"],
    request_timeout: float = DEFAULTS["request_timeout"],
    spawn_dtime: float = DEFAULTS["spawn_dtime"],
    together: bool = True,
    timeout_s: float = 900.0,
    pip_args: str = "",
) -> dict[str, Any]:
    """One hivemind averaging run in its own venv (made on first use); the summary figures.

    ``together`` (default): every peer starts its rounds once all averagers are ready, and
    ``wall_s`` and ``cpu_s`` run from that common start, as dmoe's side measures. False: each
    peer starts as soon as it is ready and both run from the first peer's start, the shape of
    hivemind's script. ``wall_with_startup_s`` and ``cpu_with_startup_s`` count from the first
    peer's start either way.

    Writes the hivemind side's log and full output (every peer-round) under ``out_dir``;
    raises ``RuntimeError`` when that side fails or outlives ``timeout_s`` (its whole process
    group, p2pd daemons included, is killed either way).
    """
    from hivemind_venv import run_inner

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = out_dir / f"hivemind-averaging-{stamp}"
    cmd = [str(venv_python(pip_args)), str(Path(__file__).resolve()), "--inner"]
    for name, value in (
        ("peers", peers), ("target-group-size", target_group_size), ("rounds", rounds),
        ("hid-size", hid_size), ("num-layers", num_layers),
        ("min-matchmaking-time", min_matchmaking_time), ("round-timeout", round_timeout),
        ("request-timeout", request_timeout), ("spawn-dtime", spawn_dtime),
        ("peer-timeout", timeout_s),
    ):  # fmt: skip
        cmd += [f"--{name}", str(value)]
    if together:
        cmd.append("--together")
    full = run_inner(cmd, base.with_suffix(".log"), timeout=timeout_s + 120)
    base.with_suffix(".json").write_text(json.dumps(full, indent=1))
    return {k: v for k, v in full.items() if k != "records"}


def print_summary(result: dict[str, Any]) -> None:
    error = result["max_abs_error"]
    print(
        f"{result['system']} averaging: {result['peers']} peers, target group "
        f"{result['target_group_size']}, {result['rounds']} rounds, {result['tensors']} tensors "
        f"({result['floats_per_peer']:,} floats, fp16 on the wire)"
    )
    print(
        f"start {result['start']}: wall {result['wall_s']:.1f} s (start-up "
        f"{result['startup_s']:.1f} s, {result['wall_with_startup_s']:.1f} s in all), success "
        f"{result['success_rate']:.2%} ({result['rounds_ok']}/{result['rounds_total']}), mean "
        f"group {result['mean_group_size']:.2f} {result['group_sizes']}, max |error| "
        f"{'-' if error is None else f'{error:.2e}'} ({result['rounds_off']} rounds off the mean "
        f"by more than {ERROR_TOLERANCE:g}), CPU {result['cpu_s']:.1f} s, load "
        f"average {result['load_average_1m_before']:.1f} before, "
        f"{result['load_average_1m']:.1f} after"
    )
    for line in result["crashed"] + result["failures"]:
        print(f"  {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in DEFAULTS.items():
        kind = type(default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    parser.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run, s")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--pip-args", default="", help="extra pip flags for the venv install")
    parser.add_argument("--out", type=Path, default=OUT, help="where the log and output go")
    parser.add_argument(
        "--staggered", action="store_true",
        help="each peer starts its rounds once it is ready, clock from the first peer's start "
        "(hivemind's script); default: all start together once every averager is ready",
    )  # fmt: skip
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--together", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer-timeout", type=float, default=900.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(hivemind_averaging(args)), flush=True)
        os._exit(0)  # hivemind's background threads would hold the exit
    result = run_hivemind(
        args.peers, args.target_group_size, args.rounds, args.hid_size, args.num_layers,
        args.out, min_matchmaking_time=args.min_matchmaking_time,
        round_timeout=args.round_timeout, request_timeout=args.request_timeout,
        spawn_dtime=args.spawn_dtime, together=not args.staggered, timeout_s=args.timeout,
        pip_args=args.pip_args,
    )  # fmt: skip
    print_summary(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
