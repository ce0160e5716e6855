"""Convergence of DMoE under asynchrony, delay and expert failures (Learning@home, sec 4.2).

Each setting (model, mean delay, failure rate) starts fresh expert servers and many
asynchronous trainer processes (``python -m services.trainer``) sharing the experts through
one DHT, and draws validation accuracy against the total number of trainer updates.

The model is the paper's MNIST model scaled to a 2-core machine:
``Linear(784, h) -> 4 DMoE layers (top-k of G experts, each an FFN block of width h) ->
LayerNorm -> Linear(h, 10)``; the dense baseline is the same model whose layers are one FFN
block of width 2h each (one "expert" per layer, so every trainer updates the same blocks: the
paper's baseline, trained in the same asynchronous swarm). An FFN block of width w costs
24 w^2 multiply-adds per sample, so top-4 of width h and one block of width 2h cost the same.

Delays are drawn per call from Exp(mean) by the expert runtime
(``--simulate-latency-distribution exp``); failures make a forward or backward fail with
UNAVAILABLE (``--simulate-failure-rate``; the trainer does not re-send them). Repeats (seeds)
of a setting run concurrently, as independent swarms (own uid prefixes, own trainers) on the
same expert processes: delay-bound settings then cost one run's wall time, not three.

x axis: total updates, the sum of all trainers' optimizer steps of one swarm, read from every
trainer's progress log (``--log-every``) and interpolated at the evaluator's (trainer 0's)
evaluation times. Staleness: the expert servers' per-expert optimizer-step counters (their
Prometheus metrics, polled) give each expert's update rate r_i; a trainer's round trip (its
forward through to its backward) lasts at most its step time T; reported are the updates of a
layer's experts during one round trip (sum_i r_i x T) and the expected number of other
trainers' updates to an expert the trainer uses in that time (load-weighted:
sum_i r_i^2 / sum_i r_i x T x (n-1)/n).

    python scripts/fetch_dataset.py        # Fashion-MNIST into benchmarks/out/data/
    python benchmarks/convergence.py       # defaults: 5 settings x 3 seeds, Fashion-MNIST
    python benchmarks/convergence.py --dataset digits --updates 60 --trainers 2 --seeds 0 \\
        --settings dmoe:0:0 --json          # a seconds-long smoke run

Outputs (``--out``, default benchmarks/out/convergence/): convergence.png, convergence.json,
logs/ (every process's log and the evaluators' histories).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from proc import free_ports, stop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.fetch_dataset import DEFAULT_DEST, fetch  # noqa: E402
from services.common.healthcheck import wait_serving  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
DEFAULT_SETTINGS = "dmoe:0:0,dmoe:100:0,dmoe:1000:0,dmoe:100:0.1,dense:1000:0"
STEPS_RE = re.compile(r'^dmoe_expert_optimizer_steps_total\{expert="([^"]+)"\} ([0-9.e+]+)$')
# Learning@home's notebook readings (MNIST, 16-64 trainers, batch 4): (label, updates, accuracy)
PAPER = [
    ("DMoE 256 experts, 1000 ms", 20_500, 0.94),
    ("dense, 1000 ms", 20_500, 0.92),
    ("DMoE 4096 experts, 10% failures", 35_800, 0.96),
]


@dataclass(frozen=True)
class Setting:
    model: str  # dmoe | dense
    latency_ms: float
    failure: float

    @property
    def name(self) -> str:
        fail = f", {self.failure:.0%} failures" if self.failure else ""
        return f"{self.model} {self.latency_ms:g} ms{fail}"


def subset_idx(source: Path, dest: Path, train: int, test: int) -> Path:
    """The first ``train``/``test`` samples of an IDX dataset as plain (uncompressed) IDX files:
    every trainer parses its data at start, and 24 trainers each inflating 30 MB of gzip on
    two cores delayed the start by minutes."""
    from services.trainer.data import _find, read_idx

    dest.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            target = dest / f"{prefix}-{kind}"
            if target.exists():
                continue
            array = read_idx(_find(source, f"{prefix}-{kind}"))
            array = array[:count] if count > 0 else array
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
                d.to_bytes(4, "big") for d in array.shape
            )
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(header + array.astype("uint8").tobytes())
            tmp.replace(target)
    return dest


def parse_settings(text: str) -> list[Setting]:
    settings = []
    for item in text.split(","):
        model, latency, failure = item.split(":")
        if model not in ("dmoe", "dense"):
            raise ValueError(f"setting {item!r}: model must be dmoe or dense")
        settings.append(Setting(model, float(latency), float(failure)))
    return settings


# ---- processes ----------------------------------------------------------------------------


def spawn(args: list[str], log: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_ports(1)[0]
    cmd = [sys.executable, "-m", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    return proc, f"127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, address: str, log: Path, timeout: float = 180) -> None:
    if wait_serving(address, timeout, alive=lambda: proc.poll() is None):
        return
    raise RuntimeError(f"{log.name} not serving: {log.read_text()[-2000:]}")


def json_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


class MetricsPoller(threading.Thread):
    """Every ``period`` seconds: each expert's optimizer-step counter, from every server."""

    def __init__(self, ports: list[int], period: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.ports, self.period = ports, period
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.done = threading.Event()

    def scrape(self) -> dict[str, float]:
        steps: dict[str, float] = {}
        for port in self.ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                if m := STEPS_RE.match(line):
                    steps[m.group(1)] = float(m.group(2))
        return steps

    def run(self) -> None:
        while not self.done.wait(self.period):
            self.samples.append((time.time(), self.scrape()))


# ---- one setting --------------------------------------------------------------------------


def layer_uids(prefix: str, layers: int, grid: int) -> list[list[str]]:
    """Uids of each layer, as the trainer's models name them (``p.j``, ``p1.j``, ...)."""
    return [[f"{prefix}{i or ''}.{j}" for j in range(grid)] for i in range(layers)]


def run_setting(args: argparse.Namespace, dht: str, index: int, setting: Setting) -> list[dict]:
    """All seeds of one setting at once; one result per seed."""
    dense = setting.model == "dense"
    grid, k_best = (1, 1) if dense else (args.grid, args.k_best)
    width = 2 * args.hidden_dim if dense else args.hidden_dim
    delay = setting.latency_ms / 1000
    logs = args.out / "logs" / f"setting{index}"
    logs.mkdir(parents=True, exist_ok=True)
    prefixes = {seed: f"c{index}s{seed}x" for seed in args.seeds}
    uids = [
        u for p in prefixes.values() for layer in layer_uids(p, args.layers, grid) for u in layer
    ]
    servers_used = min(args.servers, len(uids))  # a 1-layer dense model has one expert
    metric_ports = free_ports(servers_used)
    servers = []
    trainers: dict[int, list[tuple[subprocess.Popen, Path]]] = {}
    poller = MetricsPoller(metric_ports, args.poll_every)
    timed_out: set[int] = set()
    try:
        for s in range(servers_used):
            log = logs / f"expert{s}.log"
            servers.append(
                (
                    *spawn(
                        ["services.expert", "--experts", ",".join(uids[s::servers_used]),
                         "--hidden-dim", str(width), "--dht-peers", dht, "--update-period", "5",
                         "--seed", str(1000 * index + 100 * s), "--lr", str(args.expert_lr),
                         "--simulate-failure-rate", str(setting.failure),
                         "--simulate-latency-ms", str(setting.latency_ms),
                         "--simulate-latency-distribution", "exp", "--compute-threads", "1",
                         "--metrics-port", str(metric_ports[s])],
                        log,
                    ),
                    log,
                )
            )  # fmt: skip
        for proc, address, log in servers:
            wait_healthy(proc, address, log)
        poller.start()
        timeout = max(5.0, 10 * delay)
        data = ["--dataset", "digits"]
        if args.dataset == "fashion-mnist":
            data = ["--dataset", "mnist", "--data-path", str(args.data_path)]
        evaluator_steps = math.ceil(args.updates / args.trainers)
        for seed in args.seeds:
            trainers[seed] = []
            for t in range(args.trainers):
                log = logs / f"seed{seed}-trainer{t}.log"
                role = (
                    ["--steps", str(evaluator_steps), "--eval-every", str(args.eval_every),
                     "--history-file", str(logs / f"seed{seed}-history.json")]
                    if t == 0 else ["--steps", "0", "--eval-every", "0"]
                )  # fmt: skip
                proc, _ = spawn(
                    ["services.trainer", "--initial-peers", dht, "--uid-prefix", prefixes[seed],
                     "--grid", str(grid), "--k-best", str(k_best), "--hidden-dim", str(width),
                     "--num-layers", str(args.layers), "--final-norm", "true", *data,
                     "--eval-batch-size", str(args.eval_samples or 512),
                     "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                     "--seed", str(1000 * seed + t), "--split-seed", "0", *role,
                     "--log-format", "json", "--log-every", str(args.log_every),
                     "--metrics-port", "-1", "--forward-timeout", str(timeout),
                     "--backward-timeout", str(timeout),
                     "--timeout-after-k-min", str(max(0.5, delay)),
                     "--transient-retries", "0", "--failure-pause", "0.2"],
                    log,
                )  # fmt: skip
                trainers[seed].append((proc, log))
        deadline = time.monotonic() + args.timeout
        for seed in args.seeds:
            evaluator, log = trainers[seed][0]
            try:
                code = evaluator.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # keep the curve so far; flagged in the result
                print(f"  seed {seed}: --timeout reached, stopping its trainers", flush=True)
                timed_out.add(seed)
                stop([evaluator])
                code = 0
            if code != 0:
                raise RuntimeError(f"{log.name} exited {code}: {log.read_text()[-2000:]}")
            for proc, _ in trainers[seed][1:]:  # stop now, wait for them all below
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
    finally:
        poller.done.set()
        stop([p for ts in trainers.values() for p, _ in ts])
        stop([p for p, _, _ in servers])
    return [
        seed_result(args, seed, trainers[seed], layer_uids(prefixes[seed], args.layers, grid),
                    logs / f"seed{seed}-history.json", poller.samples) | {
            "timed_out": seed in timed_out}
        for seed in args.seeds
    ]  # fmt: skip


def progress_of(log: Path) -> tuple[list[float], list[int], int, int]:
    """A trainer's (times, steps) from its log, its final step and its skipped steps."""
    times, steps, final, failed = [], [], 0, 0
    for line in json_lines(log):
        if line["msg"] == "trainer serving":
            times.append(line["ts"])
            steps.append(0)
        elif line["msg"] in ("training", "eval") and "step" in line:
            times.append(line["ts"])
            steps.append(line["step"])
        elif line["msg"] == "training finished":
            times.append(line["ts"])
            steps.append(final := line["step"])
            failed = line.get("failed_steps", 0)
    return times, steps, final, failed


def interp(x: float, xs: list[float], ys: list[float]) -> float:
    if not xs or x <= xs[0]:
        return ys[0] if xs and x >= xs[0] else 0.0
    for i in range(len(xs) - 1):
        (x0, y0), (x1, y1) = (xs[i], ys[i]), (xs[i + 1], ys[i + 1])
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return ys[-1]


def staleness(
    progress: list[tuple[list[float], list[int]]],
    layers: list[list[str]],
    polls: list[tuple[float, dict[str, float]]],
) -> dict:
    """Over the window in which every trainer was training (see the module docstring)."""
    start = max(times[1] for times, _ in progress if len(times) > 1)
    end = min(times[-1] for times, _ in progress)
    if end <= start:  # a short run: one trainer was done before another began
        start = min(times[1] for times, _ in progress if len(times) > 1)
        end = max(times[-1] for times, _ in progress)
    if len(polls) < 2:
        return {"window_s": 0.0}
    # the polls bracketing the window (a window shorter than the poll period still gets two)
    t0, c0 = next(((t, c) for t, c in reversed(polls) if t <= start), polls[0])
    t1, c1 = next(((t, c) for t, c in polls if t >= end), polls[-1])
    span = t1 - t0
    if span <= 0:
        return {"window_s": 0.0}
    steps = [interp(t1, ts, ss) - interp(t0, ts, ss) for ts, ss in progress]
    step_time = span * len(steps) / max(1e-9, sum(steps))  # harmonic mean over trainers
    n = len(progress)
    global_updates, stale = [], []
    for uids in layers:
        rates = [(c1.get(u, 0.0) - c0.get(u, 0.0)) / span for u in uids]
        total = sum(rates)
        global_updates.append(total * step_time)
        if total > 0:
            stale.append(sum(r * r for r in rates) / total * step_time * (n - 1) / n)
    return {
        "window_s": round(span, 1),
        "step_time_s": round(step_time, 3),
        "layer_updates_per_round_trip": round(sum(global_updates) / len(global_updates), 2),
        "expert_staleness": round(sum(stale) / len(stale), 2) if stale else None,
    }


def seed_result(
    args: argparse.Namespace,
    seed: int,
    trainers: list[tuple[subprocess.Popen, Path]],
    layers: list[list[str]],
    history_file: Path,
    polls: list[tuple[float, dict[str, float]]],
) -> dict:
    runs = [progress_of(log) for _, log in trainers]
    progress = [(times, steps) for times, steps, _, _ in runs]
    history = json.loads(history_file.read_text())["history"]
    curve = [
        [round(sum(interp(h["time"], ts, ss) for ts, ss in progress)), round(h["test_accuracy"], 4)]
        for h in history
    ]
    last = [h["test_accuracy"] for h in history[-args.final_evals :]]
    times = [t for ts, _ in progress for t in ts]
    total = sum(final for _, _, final, _ in runs)
    return {
        "seed": seed,
        "trainer_seeds": [1000 * seed + t for t in range(len(trainers))],
        "total_updates": total,
        "updates_per_s": round(total / max(1e-9, max(times) - min(times)), 2),
        "evaluator_steps": history[-1]["step"],
        "final_accuracy": round(sum(last) / len(last), 4),
        "last_accuracy": round(history[-1]["test_accuracy"], 4),
        "failed_steps": sum(failed for _, _, _, failed in runs),
        "staleness": staleness(progress, layers, polls),
        "curve": curve,
    }


# ---- summary ------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 4) -> dict:
    return {
        "mean": round(sum(values) / len(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def summarize(setting: Setting, runs: list[dict], points: int = 40) -> dict:
    """Per-seed curves resampled on a common updates axis; mean and min..max over seeds."""
    low = max(r["curve"][0][0] for r in runs)  # the first eval: others may be training already
    top = min(r["curve"][-1][0] for r in runs)
    xs = [round(low + (top - low) * i / (points - 1)) for i in range(points)]
    ys = [
        [interp(x, [p[0] for p in r["curve"]], [p[1] for p in r["curve"]]) for r in runs]
        for x in xs
    ]
    stale = [r["staleness"] for r in runs if r["staleness"].get("step_time_s")]
    return {
        "name": setting.name,
        "model": setting.model,
        "latency_ms": setting.latency_ms,
        "failure_rate": setting.failure,
        "final_accuracy": spread([r["final_accuracy"] for r in runs]),
        "total_updates": spread([r["total_updates"] for r in runs], 0),
        "updates_per_s": spread([r["updates_per_s"] for r in runs], 2),
        "failed_steps": sum(r["failed_steps"] for r in runs),
        "timed_out_seeds": [r["seed"] for r in runs if r.get("timed_out")],
        "staleness": {
            key: spread([s[key] for s in stale if s.get(key) is not None], 2)
            for key in ("step_time_s", "layer_updates_per_round_trip", "expert_staleness")
            if any(s.get(key) is not None for s in stale)
        },
        "curve": {
            "updates": xs,
            "mean": [round(sum(y) / len(y), 4) for y in ys],
            "min": [round(min(y), 4) for y in ys],
            "max": [round(max(y), 4) for y in ys],
        },
        "runs": runs,
    }


def at(result: dict, x: float, key: str = "mean") -> float:
    return interp(x, result["curve"]["updates"], result["curve"][key])


def targets(results: list[dict], early_fraction: float) -> dict:
    """Failure gap (<= 1 point) and DMoE vs dense early at the same delay."""
    out: dict = {}
    for faulty in (r for r in results if r["failure_rate"] > 0):
        base = next(
            (
                r
                for r in results
                if r["failure_rate"] == 0
                and r["model"] == faulty["model"]
                and r["latency_ms"] == faulty["latency_ms"]
            ),
            None,
        )
        if base:
            gap = 100 * (base["final_accuracy"]["mean"] - faulty["final_accuracy"]["mean"])
            out[f"failure_gap_points[{faulty['name']}]"] = round(gap, 2)
            out[f"failure_within_1_point[{faulty['name']}]"] = gap <= 1.0
    for dense in (r for r in results if r["model"] == "dense" and r["failure_rate"] == 0):
        moe = next(
            (
                r
                for r in results
                if r["model"] == "dmoe" and r["failure_rate"] == 0
                and r["latency_ms"] == dense["latency_ms"]
            ),
            None,
        )  # fmt: skip
        if moe:
            x = early_fraction * min(moe["curve"]["updates"][-1], dense["curve"]["updates"][-1])
            key = f"{dense['latency_ms']:g} ms"
            out[f"early_updates[{key}]"] = round(x)
            out[f"early_dmoe_accuracy[{key}]"] = round(at(moe, x), 4)
            out[f"early_dense_accuracy[{key}]"] = round(at(dense, x), 4)
            out[f"dmoe_ahead_early[{key}]"] = at(moe, x) > at(dense, x)
            out[f"dmoe_ahead_early_beyond_spread[{key}]"] = at(moe, x, "min") > at(dense, x, "max")
    return out


def plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    """Validation accuracy against total updates: seed mean, min..max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=100)
    for r in results:
        c = r["curve"]
        (line,) = ax.plot(c["updates"], c["mean"], lw=1.8, label=r["name"])
        ax.fill_between(c["updates"], c["min"], c["max"], color=line.get_color(), alpha=0.18)
    ax.set_xlabel("total updates (optimizer steps, summed over all trainers)")
    ax.set_ylabel(f"validation accuracy ({args.dataset}, {args.eval_samples or 'all'} samples)")
    ax.set_title(
        f"DMoE vs dense under delay and failures: {args.trainers} async trainers, "
        f"{len(args.seeds)} seeds",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right", title="mean, min..max shaded", title_fontsize=8)
    note = "Learning@home (MNIST, batch 4, 16-64 trainers; far beyond this x range): " + "; ".join(
        f"{label} {acc:.2f} at {n / 1000:.1f}k updates" for label, n, acc in PAPER
    )
    fig.text(0.01, 0.01, textwrap.fill(note, 135), fontsize=6.5, color="0.35")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="model:delay_ms:failure,...")
    parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    parser.add_argument("--data-path", type=Path, default=None, help="IDX dir (default: fetch)")
    parser.add_argument("--updates", type=int, default=400, help="total updates per run")
    parser.add_argument("--trainers", type=int, default=8, help="trainer processes per run")
    parser.add_argument("--seeds", default="0,1,2", help="one independent run per seed")
    parser.add_argument("--layers", type=int, default=2, help="DMoE layers (paper: 4)")
    parser.add_argument("--grid", type=int, default=16, help="experts per DMoE layer")
    parser.add_argument("--k-best", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=64, help="DMoE width (dense: 2x)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="trainers' Adam")
    parser.add_argument("--expert-lr", type=float, default=1e-3, help="experts' Adam")
    parser.add_argument("--servers", type=int, default=2, help="expert server processes")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluator steps")
    parser.add_argument(
        "--eval-samples", type=int, default=2000, help="first N test samples; 0: all 10,000"
    )
    parser.add_argument("--train-samples", type=int, default=20000, help="first N; 0: all")
    parser.add_argument("--final-evals", type=int, default=3, help="evals averaged for 'final'")
    parser.add_argument("--early-fraction", type=float, default=0.25, help="'early' = this x")
    parser.add_argument("--log-every", type=int, default=5, help="trainers' progress lines")
    parser.add_argument("--poll-every", type=float, default=2.0, help="expert metrics, s")
    parser.add_argument("--timeout", type=float, default=560, help="per setting, seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "convergence")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument(
        "--replot", type=Path, default=None, help="redraw the PNG beside this convergence.json"
    )
    args = parser.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        plot(
            report["settings"],
            argparse.Namespace(**report["config"]),
            args.replot.with_suffix(".png"),
        )
        return 0
    args.seeds = [int(s) for s in args.seeds.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop the swarm
    settings = parse_settings(args.settings)
    if args.dataset == "fashion-mnist":
        source = args.data_path or fetch(DEFAULT_DEST)
        args.data_path = subset_idx(
            source,
            args.out / "data" / f"subset-{args.train_samples}-{args.eval_samples}",
            args.train_samples,
            args.eval_samples,
        )
    else:
        args.eval_samples = 0  # digits: its whole 359-sample test split
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    started, load_start = time.time(), os.getloadavg()[0]
    dht, dht_address = spawn(["services.dht", "--metrics-port", "-1"], args.out / "logs/dht.log")
    results = []
    try:
        wait_healthy(dht, dht_address, args.out / "logs/dht.log")
        for i, setting in enumerate(settings):
            t0 = time.monotonic()
            result = summarize(setting, run_setting(args, dht_address, i, setting))
            results.append(result)
            f, s = result["final_accuracy"], result["staleness"]
            print(
                f"{setting.name:28s} final acc {f['mean']:.4f} [{f['min']:.4f}..{f['max']:.4f}]"
                f"  updates {result['total_updates']['mean']:.0f}"
                f"  {result['updates_per_s']['mean']:.1f} upd/s"
                f"  staleness {s.get('expert_staleness', {}).get('mean')}"
                f"  layer upd/round trip {s.get('layer_updates_per_round_trip', {}).get('mean')}"
                f"  failed steps {result['failed_steps']}  ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
    finally:
        stop([dht])
    png = args.out / "convergence.png"
    plot(results, args, png)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "out", "data_path")}
    summary = {
        "config": {**config, "x_axis": "total updates (sum over a swarm's trainers)"},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "targets": targets(results, args.early_fraction),
        "settings": results,
        "paper_readings": [{"label": a, "updates": b, "accuracy": c} for a, b, c in PAPER],
        "png": str(png),
    }
    (args.out / "convergence.json").write_text(json.dumps(summary, indent=1))
    for key, value in summary["targets"].items():
        print(f"  {key}: {value}")
    print(f"plot: {png}; logs: {args.out / 'logs'}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
