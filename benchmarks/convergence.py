"""Convergence of one model trained by a swarm of averaging trainers (Learning@home, sec 4.2).

Settings (``--settings``):

- ``dmoe:<delay ms>:<failure rate>``: the real services. Two expert servers host every DMoE
  layer's grid; ``--trainers`` trainer processes (``python -m services.trainer``) of one run
  share the experts through one DHT and average their own layers (input, gating, norm, output)
  with each other (``--average``, issue 17), so the swarm trains **one model**. A fresh run's
  trainers start from the same parameters (drawn from the run id); their data order follows
  their seeds. Delays are drawn per expert call from Exp(mean) by the expert runtime; failures
  make an expert call fail with UNAVAILABLE (never re-sent). Every trainer's learning rate and
  every expert's decay linearly to 0 over the run's ``--updates``.
- ``local``: the reference line: the same model trained centrally in one process
  (``local_moe.py``: same gating, experts, data order; nothing stale, dropped or remote).

What is measured: the accuracy of the **averaged model**. ``swarm_eval.py`` downloads every
trainer's parameters (``DownloadState``), averages them and evaluates that model through the
real expert servers, from the benchmark's own process (a training process is never stopped to
evaluate): every ``--eval-period`` s on the first ``--eval-samples`` test samples, and at the
end (total updates >= ``--updates``) on the full test set: the ``final_accuracy``. x axes: the
sum of all trainers' optimizer steps (read from the same snapshot), and wall-clock seconds since
the trainers were up. Seeds of a setting with delay run at once (waiting overlaps); at 0 ms they
run one after another, so ``updates_per_s`` there is one swarm's throughput on this machine.
Dropped expert answers (``dropped_fraction``: 1 - answered / chosen, from the trainers'
``dmoe_trainer_experts_answered`` histograms) tell delay from dropout. Staleness (the experts'
update counters, polled): other trainers' updates an expert gets during one round trip.

The delay study (``--delay-ms``, default 1000): a short real swarm at that delay measures the
staleness and the dropped answers, then ``staleness_emulation.py`` trains DMoE (experts stale)
against the paper's all-stale dense baseline with those measured staleness values, and with
them scaled to the paper's 64 trainers (documented emulation; see that module).

    python scripts/fetch_dataset.py        # Fashion-MNIST into benchmarks/out/data/
    python benchmarks/convergence.py       # the default run (about 40 minutes on 2 idle cores)
    python benchmarks/convergence.py --dataset digits --updates 60 --trainers 2 --seeds 0 \\
        --settings dmoe:0:0,local --delay-ms 0 --json    # a seconds-long smoke run

Outputs (``--out``, default benchmarks/out/convergence/): convergence.png (accuracy against
updates and against wall-clock time), delay_study.png, convergence.json, logs/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
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
DEFAULT_SETTINGS = "dmoe:0:0,dmoe:100:0,dmoe:100:0.1,local"
STEPS_RE = re.compile(r'^dmoe_expert_optimizer_steps_total\{expert="([^"]+)"\} ([0-9.e+]+)$')
ANSWERED_RE = re.compile(r"^dmoe_trainer_experts_answered_(sum|count) ([0-9.e+]+)$")
PAPER_TRAINERS = 64
# Learning@home's readings (MNIST, batch 4): (label, updates, accuracy)
PAPER = [
    ("DMoE 256 experts, 1000 ms", 1_000, 0.51),
    ("DMoE 256 experts, 1000 ms", 3_000, 0.85),
    ("DMoE 256 experts, 1000 ms", 20_500, 0.94),
    ("Large FFN, 1000 ms", 2_000, 0.26),
    ("Large FFN, 1000 ms", 5_000, 0.29),
    ("Large FFN, 1000 ms", 20_500, 0.92),
]


@dataclass(frozen=True)
class Setting:
    model: str  # dmoe | local
    latency_ms: float = 0.0
    failure: float = 0.0

    @property
    def name(self) -> str:
        if self.model == "local":
            return "local (central reference)"
        fail = f", {self.failure:.0%} failures" if self.failure else ""
        return f"dmoe {self.latency_ms:g} ms{fail}"


def parse_settings(text: str) -> list[Setting]:
    settings = []
    for item in filter(None, text.split(",")):
        if item == "local":
            settings.append(Setting("local"))
            continue
        model, latency, failure = item.split(":")
        if model != "dmoe":
            raise ValueError(f"setting {item!r}: dmoe:<ms>:<failure rate> or local")
        settings.append(Setting(model, float(latency), float(failure)))
    return settings


def subset_idx(source: Path, dest: Path) -> Path:
    """The IDX data set uncompressed: every trainer parses its data at start, and 24 trainers
    each inflating 30 MB of gzip on two cores delayed the start by minutes."""
    from services.trainer.data import _find, read_idx

    dest.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            target = dest / f"{prefix}-{kind}"
            if target.exists():
                continue
            array = read_idx(_find(source, f"{prefix}-{kind}"))
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
                d.to_bytes(4, "big") for d in array.shape
            )
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(header + array.astype("uint8").tobytes())
            tmp.replace(target)
    return dest


def load_data(args: argparse.Namespace, order_seed: int = 0):  # -> Dataset
    from services.trainer.data import load_dataset

    if args.dataset == "digits":
        return load_dataset("digits", seed=0, order_seed=order_seed)
    return load_dataset("mnist", str(args.data_path), seed=0, order_seed=order_seed)


# ---- processes ----------------------------------------------------------------------------


def spawn(args: list[str], log: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_ports(1)[0]
    cmd = [sys.executable, "-m", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    return proc, f"127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, address: str, log: Path, timeout: float = 240) -> None:
    if wait_serving(address, timeout, alive=lambda: proc.poll() is None):
        return
    raise RuntimeError(f"{log.name} not serving: {log.read_text()[-2000:]}")


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def json_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


class MetricsPoller(threading.Thread):
    """Every ``period`` seconds: each expert's optimizer-step counter, from every server."""

    def __init__(self, ports: list[int], period: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.ports, self.period = ports, period
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            steps: dict[str, float] = {}
            for port in self.ports:
                for line in scrape(port).splitlines():
                    if m := STEPS_RE.match(line):
                        steps[m.group(1)] = float(m.group(2))
            self.samples.append((time.time(), steps))


def layer_uids(prefix: str, layers: int, grid: int) -> list[list[str]]:
    """Uids of each layer, as the trainer's models name them (``p.j``, ``p1.j``, ...)."""
    return [[f"{prefix}{i or ''}.{j}" for j in range(grid)] for i in range(layers)]


class Experts:
    """The expert servers of one setting (every seed's grid, spread over ``--servers``)."""

    def __init__(self, args: argparse.Namespace, dht: str, setting: Setting, prefixes: list[str],
                 logs: Path, index: int) -> None:  # fmt: skip
        uids = [
            u for p in prefixes for layer in layer_uids(p, args.layers, args.grid) for u in layer
        ]
        count = min(args.servers, len(uids))
        self.metric_ports = free_ports(count)
        self.procs: list[subprocess.Popen] = []
        started = []
        for s in range(count):
            log = logs / f"expert{s}.log"
            proc, address = spawn(
                ["services.expert", "--experts", ",".join(uids[s::count]),
                 "--hidden-dim", str(args.hidden_dim), "--dht-peers", dht, "--update-period", "5",
                 "--seed", str(1000 * index + 100 * s), "--lr", str(args.expert_lr),
                 "--total-steps", str(args.updates),
                 "--simulate-failure-rate", str(setting.failure),
                 "--simulate-latency-ms", str(setting.latency_ms),
                 "--simulate-latency-distribution", "exp", "--compute-threads", "1",
                 "--metrics-port", str(self.metric_ports[s])],
                log,
            )  # fmt: skip
            self.procs.append(proc)
            started.append((proc, address, log))
        for proc, address, log in started:
            wait_healthy(proc, address, log)
        self.poller = MetricsPoller(self.metric_ports, args.poll_every)
        self.poller.start()

    def close(self) -> None:
        self.poller.done.set()
        stop(self.procs)


# ---- one swarm (one seed of a dmoe setting) -------------------------------------------------


class Swarm:
    """``--trainers`` averaging trainers of one run, and the evaluator of their model."""

    def __init__(self, args: argparse.Namespace, dht: str, setting: Setting, seed: int,
                 prefix: str, logs: Path, dataset, log_every: int = 0) -> None:  # fmt: skip
        from swarm_eval import SwarmEvaluator

        self.args, self.seed, self.logs = args, seed, logs
        delay = setting.latency_ms / 1000
        timeout = max(5.0, 10 * delay)
        self.run_id = f"{prefix}run"
        data = ["--dataset", "digits"]
        if args.dataset == "fashion-mnist":
            data = ["--dataset", "mnist", "--data-path", str(args.data_path)]
        self.trainers: list[tuple[subprocess.Popen, str, Path]] = []
        self.metric_ports = free_ports(args.trainers)
        decay = max(1, round(args.updates / args.trainers))
        for t in range(args.trainers):
            log = logs / f"seed{seed}-trainer{t}.log"
            proc, address = spawn(
                ["services.trainer", "--initial-peers", dht, "--uid-prefix", prefix,
                 "--grid", str(args.grid), "--k-best", str(args.k_best),
                 "--hidden-dim", str(args.hidden_dim), "--num-layers", str(args.layers),
                 "--final-norm", "true", *data, "--eval-every", "0", "--steps", "0",
                 "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                 "--lr-decay-steps", str(decay), "--seed", str(1000 * seed + t),
                 "--split-seed", "0", "--run-id", self.run_id,
                 "--average-every", str(args.average_every),
                 "--average-period", str(args.average_period),
                 "--log-format", "json", "--log-every", str(log_every or args.log_every),
                 "--metrics-port", str(self.metric_ports[t]),
                 "--forward-timeout", str(timeout), "--backward-timeout", str(timeout),
                 "--timeout-after-k-min", str(max(0.5, delay)),
                 "--transient-retries", "0", "--failure-pause", "0.2"],
                log,
            )  # fmt: skip
            self.trainers.append((proc, address, log))
        for proc, address, log in self.trainers:
            wait_healthy(proc, address, log)
        self.started = time.time()
        self.evaluator = SwarmEvaluator(
            dht, prefix, self.run_id, [a for _, a, _ in self.trainers], dataset,
            hidden=args.hidden_dim, layers=args.layers, grid=args.grid, k_best=args.k_best,
            timeout=timeout,
        )  # fmt: skip
        self.curve: list[list[float]] = []  # [updates, accuracy, seconds]
        self.result: dict | None = None

    def evaluate(self) -> bool:
        """One point of the curve; at ``--updates``, the end of the run. True when done."""
        snap = self.evaluator.snapshot()
        if not self.curve:
            self.started = self.first_serving()
        accuracy = self.evaluator.accuracy(snap, self.args.eval_samples)
        self.curve.append([snap.updates, round(accuracy, 4), round(snap.time - self.started, 1)])
        print(f"    seed {self.seed}: {snap.updates} updates, accuracy {accuracy:.3f} "
              f"({snap.time - self.started:.0f} s)", flush=True)  # fmt: skip
        if snap.updates < self.args.updates:
            return False
        dropped = self.dropped_fraction()
        self.stop()
        final = self.evaluator.accuracy(snap, 0)
        seconds = snap.time - self.started
        self.result = {
            "seed": self.seed,
            "final_accuracy": round(final, 4),
            "updates": snap.updates,
            "trainer_steps": snap.steps,
            "seconds": round(seconds, 1),
            "updates_per_s": round(snap.updates / seconds, 2),
            "samples_per_s": round(snap.updates * self.args.batch_size / seconds, 1),
            "dropped_fraction": dropped,
            "evaluator_cpu_s": round(self.evaluator.cpu_seconds, 1),
            "curve": self.curve,
        }
        self.evaluator.close()
        return True

    def dropped_fraction(self) -> float | None:
        """1 - answered / chosen over the trainers' ``experts_answered`` histograms."""
        answered = [0.0, 0.0]
        for port in self.metric_ports:
            for line in scrape(port).splitlines():
                if m := ANSWERED_RE.match(line):
                    answered[m.group(1) == "count"] += float(m.group(2))
        chosen = answered[1] * self.args.k_best
        return round(1 - answered[0] / chosen, 4) if chosen else None

    def first_serving(self) -> float:
        """When the first trainer could train: the clock of the wall-time axis."""
        return min(progress_of(log)[0][0] for _, _, log in self.trainers)

    def stop(self) -> None:
        for proc, _, _ in self.trainers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        stop([p for p, _, _ in self.trainers])


def progress_of(log: Path) -> tuple[list[float], list[int]]:
    """A trainer's (times, steps) from its progress log."""
    times, steps = [], []
    for line in json_lines(log):
        if line["msg"] == "trainer serving":
            times.append(line["ts"])
            steps.append(0)
        elif line["msg"] in ("training", "training finished") and "step" in line:
            times.append(line["ts"])
            steps.append(line["step"])
    return times, steps


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
    """Over the window in which every trainer was training: the step time T (harmonic mean),
    the updates a layer's experts get during one round trip, the expected other trainers'
    updates to an expert a trainer uses in that time (load-weighted: sum r_i^2 / sum r_i x T x
    (n-1)/n), and the other trainers' updates during one round trip (an all-stale dense
    model's staleness)."""
    usable = [(ts, ss) for ts, ss in progress if len(ts) > 1]
    if len(polls) < 2 or not usable:
        return {"window_s": 0.0}
    start = max(ts[1] for ts, _ in usable)
    end = min(ts[-1] for ts, _ in usable)
    if end <= start:
        start, end = min(ts[1] for ts, _ in usable), max(ts[-1] for ts, _ in usable)
    t0, c0 = next(((t, c) for t, c in reversed(polls) if t <= start), polls[0])
    t1, c1 = next(((t, c) for t, c in polls if t >= end), polls[-1])
    span = t1 - t0
    if span <= 0:
        return {"window_s": 0.0}
    steps = [interp(t1, ts, ss) - interp(t0, ts, ss) for ts, ss in usable]
    step_time = span * len(steps) / max(1e-9, sum(steps))
    n = len(usable)
    layer_updates, stale = [], []
    for uids in layers:
        rates = [(c1.get(u, 0.0) - c0.get(u, 0.0)) / span for u in uids]
        total = sum(rates)
        layer_updates.append(total * step_time)
        if total > 0:
            stale.append(sum(r * r for r in rates) / total * step_time * (n - 1) / n)
    return {
        "window_s": round(span, 1),
        "step_time_s": round(step_time, 3),
        "layer_updates_per_round_trip": round(sum(layer_updates) / len(layer_updates), 2),
        "expert_staleness": round(sum(stale) / len(stale), 2) if stale else None,
        "dense_staleness": round(sum(steps) / span * step_time * (n - 1) / n, 2),
    }


def run_dmoe(args: argparse.Namespace, dht: str, index: int, setting: Setting) -> list[dict]:
    """Every seed of a dmoe setting: together when delayed, one after another at 0 ms."""
    logs = args.out / "logs" / f"setting{index}"
    logs.mkdir(parents=True, exist_ok=True)
    prefixes = {seed: f"c{index}s{seed}x" for seed in args.seeds}
    experts = Experts(args, dht, setting, list(prefixes.values()), logs, index)
    dataset = load_data(args)
    groups = [args.seeds] if setting.latency_ms > 0 else [[s] for s in args.seeds]
    results = []
    try:
        for group in groups:
            swarms: list[Swarm] = []
            try:
                for seed in group:
                    swarms.append(Swarm(args, dht, setting, seed, prefixes[seed], logs, dataset))
                deadline = time.monotonic() + args.timeout
                active = list(swarms)
                while active:
                    next_point = time.monotonic() + args.eval_period
                    active = [s for s in active if not s.evaluate()]
                    if active and time.monotonic() > deadline:
                        raise RuntimeError(f"{setting.name}: --timeout {args.timeout} s reached")
                    time.sleep(max(0.0, next_point - time.monotonic()))
            finally:
                for swarm in swarms:
                    swarm.stop()
            for swarm in swarms:
                assert swarm.result is not None
                progress = [progress_of(log) for _, _, log in swarm.trainers]
                layers = layer_uids(prefixes[swarm.seed], args.layers, args.grid)
                swarm.result["staleness"] = staleness(progress, layers, experts.poller.samples)
                results.append(swarm.result)
    finally:
        experts.close()
    return results


def run_local(args: argparse.Namespace, seed: int) -> dict:
    from local_moe import accuracy, train_local

    dataset = load_data(args, order_seed=1000 * seed)
    subset = load_data(args, order_seed=1000 * seed)
    if args.eval_samples:
        subset.test_x, subset.test_y = (
            subset.test_x[: args.eval_samples],
            subset.test_y[: args.eval_samples],
        )
    run = train_local(
        dataset, hidden=args.hidden_dim, layers=args.layers, grid=[args.grid],
        k_best=args.k_best, lr=args.local_lr, batch_size=args.batch_size, updates=args.updates,
        eval_every=max(1, args.updates // 40), seed=seed, evaluate=lambda m: accuracy(m, subset),
        decay=True,
    )  # fmt: skip
    seconds = max(1e-9, run["train_seconds"])
    return {
        "seed": seed,
        "final_accuracy": round(accuracy(run["model"], dataset), 4),
        "updates": args.updates,
        "seconds": round(seconds, 1),
        "updates_per_s": round(args.updates / seconds, 2),
        "samples_per_s": round(args.updates * args.batch_size / seconds, 1),
        "dropped_fraction": 0.0,
        "curve": [[u, round(a, 4), round(s, 2)] for u, a, s in run["curve"]],
    }


# ---- the delay study ------------------------------------------------------------------------


def measure_delay(args: argparse.Namespace, dht: str, index: int) -> dict:
    """A real swarm at ``--delay-ms`` for ``--delay-measure-s``: staleness and dropped answers."""
    setting = Setting("dmoe", args.delay_ms, 0.0)
    logs = args.out / "logs" / f"delay{index}"
    logs.mkdir(parents=True, exist_ok=True)
    prefix = f"c{index}dx"
    experts = Experts(args, dht, setting, [prefix], logs, index)
    swarm = None
    try:
        swarm = Swarm(args, dht, setting, 0, prefix, logs, load_data(args), log_every=1)
        time.sleep(args.delay_measure_s)
        dropped = swarm.dropped_fraction()
        snap = swarm.evaluator.snapshot()
        swarm.stop()
        swarm.evaluator.close()
    finally:
        if swarm is not None:
            swarm.stop()
        experts.close()
    progress = [progress_of(log) for _, _, log in swarm.trainers]
    stale = staleness(progress, layer_uids(prefix, args.layers, args.grid), experts.poller.samples)
    seconds = snap.time - swarm.first_serving()
    return {
        "latency_ms": args.delay_ms,
        "trainers": args.trainers,
        "seconds": round(seconds, 1),
        "updates": snap.updates,
        "updates_per_s": round(snap.updates / seconds, 2),
        "dropped_fraction": dropped,
        "staleness": stale,
    }


def delay_study(args: argparse.Namespace, measured: dict) -> list[dict]:
    """Emulated DMoE (stale experts) vs all-stale dense at the measured staleness, and at it
    scaled to the paper's 64 trainers (staleness grows with the other trainers' count)."""
    from staleness_emulation import train_stale

    stale = measured["staleness"]
    n = args.trainers
    scale = (PAPER_TRAINERS - 1) / max(1, n - 1)
    cases = []
    for trainers, factor in ((n, 1.0), (PAPER_TRAINERS, scale)):
        expert_tau = round((stale.get("expert_staleness") or 0.0) * factor)
        dense_tau = round((stale.get("dense_staleness") or 0.0) * factor)
        cases += [("dmoe", trainers, expert_tau), ("dense", trainers, dense_tau)]
    results = []
    for model, trainers, tau in cases:
        runs = []
        for seed in args.seeds:
            dataset = load_data(args, order_seed=1000 * seed)
            run = train_stale(
                dataset, model, tau, hidden=args.hidden_dim, layers=args.layers,
                grid=args.grid, k_best=args.k_best, lr=args.local_lr, batch_size=args.batch_size,
                updates=args.delay_updates, eval_every=max(1, args.delay_updates // 40),
                seed=seed, eval_samples=args.eval_samples,
            )  # fmt: skip
            runs.append({"seed": seed, "final_accuracy": round(run["final_accuracy"], 4),
                         "updates": args.delay_updates, "seconds": round(run["seconds"], 1),
                         "curve": [[u, round(a, 4)] for u, a in run["curve"]]})  # fmt: skip
        finals = [r["final_accuracy"] for r in runs]
        results.append({
            "name": f"{model} {args.delay_ms:g} ms, {trainers} trainers, staleness {tau}",
            "model": model, "latency_ms": args.delay_ms, "failure_rate": 0.0, "emulated": True,
            "trainers": trainers, "staleness": tau, "final_accuracy": spread(finals),
            "updates": args.delay_updates,
            # the real swarm's pace at this delay (measured with --trainers trainers only)
            "updates_per_s": measured["updates_per_s"] if trainers == args.trainers else None,
            "samples_per_s": round(measured["updates_per_s"] * args.batch_size, 1)
            if trainers == args.trainers else None,
            "dropped_fraction": measured["dropped_fraction"] if model == "dmoe" else 0.0,
            "curve": resample(runs), "runs": runs,
        })  # fmt: skip
        print(f"  {results[-1]['name']:52s} final acc {spread(finals)}", flush=True)
    return results


# ---- summary ------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float], digits: int = 4) -> dict:
    return {
        "mean": round(sum(values) / len(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def resample(runs: list[dict], column: int = 0, points: int = 40) -> dict:
    """Per-seed curves on a common x axis (``column`` 0: updates, 2: seconds)."""
    low = max(r["curve"][0][column] for r in runs)
    top = min(r["curve"][-1][column] for r in runs)
    xs = [round(low + (top - low) * i / (points - 1), 2) for i in range(points)]
    ys = [
        [interp(x, [p[column] for p in r["curve"]], [p[1] for p in r["curve"]]) for r in runs]
        for x in xs
    ]
    return {
        "x": xs,
        "mean": [round(sum(y) / len(y), 4) for y in ys],
        "min": [round(min(y), 4) for y in ys],
        "max": [round(max(y), 4) for y in ys],
    }


def summarize(setting: Setting, runs: list[dict]) -> dict:
    dropped = [r["dropped_fraction"] for r in runs if r["dropped_fraction"] is not None]
    stale = [r["staleness"] for r in runs if r.get("staleness", {}).get("step_time_s")]
    return {
        "name": setting.name,
        "model": setting.model,
        "latency_ms": setting.latency_ms,
        "failure_rate": setting.failure,
        "final_accuracy": spread([r["final_accuracy"] for r in runs]),
        "updates": round(mean([r["updates"] for r in runs])),
        "updates_per_s": round(mean([r["updates_per_s"] for r in runs]), 2),
        "samples_per_s": round(mean([r["samples_per_s"] for r in runs]), 1),
        "updates_per_s_range": spread([r["updates_per_s"] for r in runs], 2),
        "dropped_fraction": round(sum(dropped) / len(dropped), 4) if dropped else None,
        "staleness": {
            key: spread([s[key] for s in stale if s.get(key) is not None], 2)
            for key in ("step_time_s", "expert_staleness", "dense_staleness")
            if any(s.get(key) is not None for s in stale)
        },
        "curve": resample(runs, 0),
        "wall_curve": resample(runs, 2),
        "runs": runs,
    }


def targets(results: list[dict]) -> dict:
    out: dict = {}
    base = next((r for r in results if r["model"] == "dmoe" and r["latency_ms"] == 0
                 and r["failure_rate"] == 0), None)  # fmt: skip
    if base:
        out["dmoe_0ms_final_accuracy"] = base["final_accuracy"]["mean"]
        out["dmoe_0ms_at_least_0.85"] = base["final_accuracy"]["mean"] >= 0.85
        out["dmoe_0ms_updates_per_s"] = base["updates_per_s"]
        for r in results:
            if r is base or r["model"] != "dmoe" or r.get("emulated"):
                continue
            gap = 100 * (base["final_accuracy"]["mean"] - r["final_accuracy"]["mean"])
            out[f"gap_points[{r['name']}]"] = round(gap, 2)
            out[f"within_2_points[{r['name']}]"] = gap <= 2.0
    return out


def plot(results: list[dict], delay: list[dict], args: argparse.Namespace, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100, sharey=True)
    for ax, key, label in (
        (axes[0], "curve", "total updates (optimizer steps, summed over a swarm's trainers)"),
        (axes[1], "wall_curve", "wall-clock time since the trainers were up (s)"),
    ):
        for r in results:
            c = r[key]
            local = r["model"] == "local"
            style = {"color": "black", "ls": "--"} if local else {}
            (line,) = ax.plot(c["x"], c["mean"], lw=1.8, label=r["name"], **style)
            ax.fill_between(c["x"], c["min"], c["max"], color=line.get_color(), alpha=0.15)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(
        f"test accuracy ({args.dataset}, first {args.eval_samples or 'all'} samples)"
    )
    axes[0].set_ylim(0, 1)
    axes[1].legend(fontsize=8, loc="lower right", title="mean of seeds, min..max shaded",
                   title_fontsize=8)  # fmt: skip
    fig.suptitle(
        f"One model trained by {args.trainers} averaging trainers (DMoE, {args.layers} layers x "
        f"{args.grid} experts, top-{args.k_best}, batch {args.batch_size}), "
        f"{len(args.seeds)} seeds",
        fontsize=10,
    )
    fig.tight_layout()
    paths.append(out / "convergence.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    if delay:
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
        for r in delay:
            c = r["curve"]
            style = "-" if r["model"] == "dmoe" else "--"
            (line,) = ax.plot(c["x"], c["mean"], style, lw=1.8, label=r["name"])
            ax.fill_between(c["x"], c["min"], c["max"], color=line.get_color(), alpha=0.15)
        for label, updates, acc in PAPER:
            if updates <= (delay[0]["curve"]["x"][-1] or 0):
                marker = "o" if label.startswith("DMoE") else "s"
                ax.plot([updates], [acc], marker, color="0.4", ms=5)
        ax.set_xlabel("updates (emulated asynchronous steps)")
        ax.set_ylabel(f"test accuracy ({args.dataset}, first {args.eval_samples or 'all'} samples)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right", title="grey: paper's readings (MNIST; o DMoE, "
                  "s Large FFN)", title_fontsize=7.5)  # fmt: skip
        ax.set_title(f"Delay study at {args.delay_ms:g} ms: staleness measured on the real "
                     "services, training emulated", fontsize=10)  # fmt: skip
        fig.tight_layout()
        paths.append(out / "delay_study.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# ---- main ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings", default=DEFAULT_SETTINGS, help="dmoe:<ms>:<failure>|local,..."
    )
    parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    parser.add_argument("--data-path", type=Path, default=None, help="IDX dir (default: fetch)")
    parser.add_argument("--updates", type=int, default=4000, help="total updates per run")
    parser.add_argument("--trainers", type=int, default=8, help="trainer processes per swarm")
    parser.add_argument("--seeds", default="0,1,2", help="one independent run per seed")
    parser.add_argument("--layers", type=int, default=2, help="DMoE layers")
    parser.add_argument("--grid", type=int, default=16, help="experts per DMoE layer")
    parser.add_argument("--k-best", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-3, help="trainers' Adam (decays to 0)")
    parser.add_argument("--local-lr", type=float, default=1e-3, help="the reference's Adam")
    parser.add_argument("--expert-lr", type=float, default=5e-4, help="experts' Adam (decays)")
    parser.add_argument("--average-every", type=int, default=5, help="trainer steps")
    parser.add_argument("--average-period", type=float, default=1.5, help="averaging slot, s")
    parser.add_argument("--servers", type=int, default=2, help="expert server processes")
    parser.add_argument("--eval-period", type=float, default=10.0, help="s between points")
    parser.add_argument("--eval-samples", type=int, default=2000, help="curve points; 0: all")
    parser.add_argument("--log-every", type=int, default=10, help="trainers' progress lines")
    parser.add_argument("--poll-every", type=float, default=2.0, help="expert metrics, s")
    parser.add_argument("--delay-ms", type=float, default=1000, help="delay study; 0: none")
    parser.add_argument("--delay-measure-s", type=float, default=90, help="its real swarm")
    parser.add_argument("--delay-updates", type=int, default=2000, help="its emulated runs")
    parser.add_argument("--timeout", type=float, default=1200, help="per group of seeds, s")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "convergence")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--replot", type=Path, default=None, help="redraw beside convergence.json")
    args = parser.parse_args()
    if args.replot:
        report = json.loads(args.replot.read_text())
        plot(report["settings"][: report["swarm_settings"]],
             report["settings"][report["swarm_settings"] :],
             argparse.Namespace(**report["config"]), args.replot.parent)  # fmt: skip
        return 0
    args.seeds = [int(s) for s in args.seeds.split(",")]
    # the evaluator's own swarm client logs every failed expert call; the summary counts them
    logging.getLogger("services").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop the swarm
    settings = parse_settings(args.settings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    if args.dataset == "fashion-mnist":
        source = args.data_path or fetch(DEFAULT_DEST)
        args.data_path = subset_idx(source, args.out / "data" / "fashion-mnist-idx")
    started, load_start = time.time(), os.getloadavg()[0]
    dht, dht_address = spawn(["services.dht", "--metrics-port", "-1"], args.out / "logs/dht.log")
    results, delay, measured = [], [], None
    try:
        wait_healthy(dht, dht_address, args.out / "logs/dht.log")
        for i, setting in enumerate(settings):
            t0 = time.monotonic()
            if setting.model == "local":
                runs = [run_local(args, seed) for seed in args.seeds]
            else:
                runs = run_dmoe(args, dht_address, i, setting)
            result = summarize(setting, runs)
            results.append(result)
            f = result["final_accuracy"]
            print(
                f"{setting.name:28s} final acc {f['mean']:.4f} [{f['min']:.4f}..{f['max']:.4f}]"
                f"  updates {result['updates']}"
                f"  {result['updates_per_s']:.1f} upd/s"
                f"  {result['samples_per_s']:.0f} samples/s"
                f"  dropped {result['dropped_fraction']}"
                f"  staleness {result['staleness'].get('expert_staleness', {}).get('mean')}"
                f"  ({time.monotonic() - t0:.0f} s)",
                flush=True,
            )
        if args.delay_ms > 0:
            t0 = time.monotonic()
            measured = measure_delay(args, dht_address, len(settings))
            print(f"delay {args.delay_ms:g} ms, real swarm: {measured}", flush=True)
            delay = delay_study(args, measured)
            print(f"delay study ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        stop([dht])
    pngs = plot(results, delay, args, args.out)
    config = {
        k: v for k, v in vars(args).items() if k not in ("json", "out", "data_path", "replot")
    }
    summary = {
        "config": config,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "targets": targets(results),
        "swarm_settings": len(results),
        "settings": results + delay,
        "delay_measurement": measured,
        "paper_readings": [{"label": a, "updates": b, "accuracy": c} for a, b, c in PAPER],
        "png": [str(p) for p in pngs],
    }
    (args.out / "convergence.json").write_text(json.dumps(summary, indent=1))
    for key, value in summary["targets"].items():
        print(f"  {key}: {value}")
    print(
        f"wall {summary['wall_s']} s; plots: {', '.join(map(str, pngs))}; logs: {args.out / 'logs'}"
    )
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
