"""Convergence of the digits MLP with a DMoE layer on a local swarm, with failures and latency.

For each setting (fraction of expert calls failing, added latency per call) it starts fresh
expert servers with the expert runtime's failure injection (``--simulate-failure-rate``,
``--simulate-latency-ms``), trains one trainer process (``python -m services.trainer``) for a
fixed number of steps, and reads the trainer's evaluation history. Reports steps/s, the final
test accuracy and the accuracy curve per setting, and draws the curves into a PNG (written by a
tiny built-in PNG encoder, so no plotting library is needed).

    python benchmarks/convergence.py                     # the four settings, 400 steps each
    python benchmarks/convergence.py --steps 200 --json  # last line: {"settings": [...]}
    python benchmarks/convergence.py --settings 0:0,0.1:0 --repeats 3  # means over 3 seeds

Both the trainer's and the experts' learning rates decay linearly to 0 over the run, so the
end of a run is a converged model rather than one noisy step of Adam. Target (issue 4): the
10% failure run ends within 1 accuracy point of the 0% run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from proc import free_ports

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.healthcheck import wait_serving  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def spawn(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    (port,) = free_ports(1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 - lives as long as the process
    )
    return proc, f"127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, address: str, log: Path, timeout: float = 120) -> None:
    if wait_serving(address, timeout, alive=lambda: proc.poll() is None):
        return
    if proc.poll() is not None:
        raise RuntimeError(f"{log.name} exited: {log.read_text()[-2000:]}")
    raise RuntimeError(f"{log.name} not healthy after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_once(
    args: argparse.Namespace,
    dht: str,
    prefix: str,
    seed: int,
    failure: float,
    latency: float,
    workdir: Path,
) -> dict:
    """One fresh swarm (experts under ``prefix``) and one trainer run with ``seed``."""
    rows = args.grid[0]
    per = args.grid[1] // args.servers
    servers = []
    try:
        for s in range(args.servers):
            pattern = f"{prefix}.[0:{rows}].[{s * per}:{(s + 1) * per}]"
            servers.append(
                spawn(
                    [
                        "services.expert",
                        "--experts",
                        pattern,
                        "--hidden-dim",
                        str(args.hidden_dim),
                        "--dht-peers",
                        dht,
                        "--update-period",
                        "5",
                        "--seed",
                        str(seed),
                        "--lr",
                        str(args.expert_lr),
                        "--simulate-failure-rate",
                        str(failure),
                        "--simulate-latency-ms",
                        str(latency),
                        "--total-steps",
                        str(args.steps),
                        "--compute-threads",
                        "1",
                    ],
                    workdir / f"{prefix}-expert{s}.log",
                )
            )
        for s, (proc, address) in enumerate(servers):
            wait_healthy(proc, address, workdir / f"{prefix}-expert{s}.log")
        history_file = workdir / f"{prefix}.json"
        trainer, _ = spawn(
            [
                "services.trainer",
                "--initial-peers",
                dht,
                "--uid-prefix",
                prefix,
                "--grid",
                f"{args.grid[0]}x{args.grid[1]}",
                "--hidden-dim",
                str(args.hidden_dim),
                "--k-best",
                str(args.k_best),
                "--steps",
                str(args.steps),
                "--lr",
                str(args.lr),
                "--eval-every",
                str(args.eval_every),
                "--seed",
                str(seed),
                "--history-file",
                str(history_file),
                "--log-format",
                "json",
                "--forward-timeout",
                "5",
                "--backward-timeout",
                "5",
                "--timeout-after-k-min",
                "0.5",
                "--lr-decay",
                "true",
                "--transient-retries",
                str(args.transient_retries),
            ],
            workdir / f"{prefix}-trainer.log",
        )
        started = time.monotonic()
        code = trainer.wait(args.timeout)
        wall = time.monotonic() - started
        if code != 0:
            raise RuntimeError(
                f"trainer exited {code}: {(workdir / f'{prefix}-trainer.log').read_text()[-2000:]}"
            )
    finally:
        for proc, _ in servers:
            stop(proc)
    history = json.loads(history_file.read_text())["history"]
    log_lines = [
        json.loads(x)
        for x in (workdir / f"{prefix}-trainer.log").read_text().splitlines()
        if x.startswith("{")
    ]
    finished = next(x for x in log_lines if x["msg"] == "training finished")
    first, last = history[0], history[-1]
    train_seconds = last["seconds"] - first["seconds"]
    return {
        "failure_rate": failure,
        "latency_ms": latency,
        "steps": last["step"],
        "steps_per_s": round((last["step"] - first["step"]) / train_seconds, 3),
        "final_accuracy": round(last["test_accuracy"], 4),
        # one eval of 359 samples moves by a point or two between evals; the mean of the last
        # four is the steadier "where the run ends"
        "final_accuracy_last4": round(
            sum(h["test_accuracy"] for h in history[-4:]) / len(history[-4:]), 4
        ),
        "final_test_loss": round(last["test_loss"], 4),
        "failed_steps": finished.get("failed_steps", 0),
        "wall_s": round(wall, 1),
        "curve": [[h["step"], round(h["test_accuracy"], 4)] for h in history],
    }


def run_setting(
    args: argparse.Namespace, dht: str, index: int, failure: float, latency: float, workdir: Path
) -> dict:
    """``--repeats`` runs with seeds ``seed, seed+1, ...``; accuracies and speed are means."""
    runs = [
        run_once(args, dht, f"conv{index}r{r}", args.seed + r, failure, latency, workdir)
        for r in range(args.repeats)
    ]
    result = dict(runs[0])
    for key in ("steps_per_s", "final_accuracy", "final_accuracy_last4", "final_test_loss"):
        result[key] = round(sum(r[key] for r in runs) / len(runs), 4)
    result["failed_steps"] = sum(r["failed_steps"] for r in runs)
    result["wall_s"] = round(sum(r["wall_s"] for r in runs), 1)
    if len(runs) > 1:
        result["runs"] = [{k: v for k, v in r.items() if k != "curve"} for r in runs]
    return result


# ---- a tiny PNG plot ------------------------------------------------------------------------


def _png(width: int, height: int, pixels: bytearray) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (
            struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        )

    raw = b"".join(
        b"\x00" + bytes(pixels[y * width * 3 : (y + 1) * width * 3]) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def plot_curves(settings: list[dict], path: Path, width: int = 640, height: int = 400) -> None:
    """Accuracy (y, 0..1) against step (x); one color per setting, gridlines every 0.1."""
    pixels = bytearray([255]) * (width * height * 3)
    left, right, top, bottom = 40, width - 10, 10, height - 30
    max_step = max((s["curve"][-1][0] for s in settings if s["curve"]), default=1) or 1

    def put(x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[(y * width + x) * 3 : (y * width + x) * 3 + 3] = bytes(color)

    def line(
        x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], thick: int = 1
    ) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            x, y = x0 + (x1 - x0) * i // steps, y0 + (y1 - y0) * i // steps
            for dx in range(thick):
                for dy in range(thick):
                    put(x + dx, y + dy, color)

    def to_xy(step: float, acc: float) -> tuple[int, int]:
        return (left + int((right - left) * step / max_step), bottom - int((bottom - top) * acc))

    for tenth in range(11):
        y = bottom - (bottom - top) * tenth // 10
        line(left, y, right, y, (225, 225, 225) if tenth % 5 else (170, 170, 170))
    line(left, top, left, bottom, (0, 0, 0))
    line(left, bottom, right, bottom, (0, 0, 0))
    for i, setting in enumerate(settings):
        color = COLORS[i % len(COLORS)]
        points = [to_xy(step, acc) for step, acc in setting["curve"]]
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            line(x0, y0, x1, y1, color, thick=2)
        line(
            left + 10 + 60 * i, height - 12, left + 50 + 60 * i, height - 12, color, thick=3
        )  # legend
    path.write_bytes(_png(width, height, pixels))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument(
        "--settings", default="0:0,0.1:0,0:100,0.1:100", help="failure:latency_ms,..."
    )
    parser.add_argument("--grid", default="4x4")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--k-best", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--expert-lr", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--transient-retries",
        type=int,
        default=1,
        help="trainer's immediate re-sends of a refused forward (0: every failure counts)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per setting (seeds seed, seed+1, ...)"
    )
    parser.add_argument("--timeout", type=float, default=900, help="per setting, seconds")
    parser.add_argument("--png", default="convergence.png", help="where to draw the curves")
    parser.add_argument("--workdir", default=None, help="logs and histories (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    args.grid = tuple(int(g) for g in args.grid.split("x"))
    if len(args.grid) != 2 or args.grid[1] % args.servers:
        parser.error("--grid must be RxC with C divisible by --servers")
    settings = [(float(f), float(ms)) for f, ms in (s.split(":") for s in args.settings.split(","))]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dmoe-convergence-"))
    workdir.mkdir(parents=True, exist_ok=True)
    dht, dht_address = spawn(["services.dht"], workdir / "dht.log")
    results = []
    try:
        wait_healthy(dht, dht_address, workdir / "dht.log")
        for i, (failure, latency) in enumerate(settings):
            result = run_setting(args, dht_address, i, failure, latency, workdir)
            results.append(result)
            if args.repeats > 1:
                print(f"  runs: {[r['final_accuracy'] for r in result['runs']]}", flush=True)
            print(
                f"failure {failure:4.0%}  latency {latency:5.0f} ms: "
                f"{result['steps_per_s']:6.2f} steps/s, final accuracy "
                f"{result['final_accuracy']:.4f} "
                f"(last 4 evals {result['final_accuracy_last4']:.4f}), "
                f"failed steps {result['failed_steps']}, "
                f"color {COLORS[i % len(COLORS)]}",
                flush=True,
            )
    finally:
        stop(dht)
    plot_curves(results, Path(args.png))
    base = next((r for r in results if r["failure_rate"] == 0 and r["latency_ms"] == 0), None)
    faulty = next((r for r in results if r["failure_rate"] > 0 and r["latency_ms"] == 0), None)
    summary = {"settings": results, "png": str(Path(args.png).resolve())}
    if base and faulty:
        gap = round(100 * (base["final_accuracy"] - faulty["final_accuracy"]), 2)
        smooth = round(100 * (base["final_accuracy_last4"] - faulty["final_accuracy_last4"]), 2)
        summary["accuracy_gap_points"] = gap
        summary["accuracy_gap_points_last4"] = smooth
        summary["target_met"] = gap <= 1.0 and smooth <= 1.0
        print(
            f"10% failures vs none: {gap:+.2f} accuracy points at the last eval, "
            f"{smooth:+.2f} over the last four (target <= 1.0; positive = failures worse)"
        )
    print(f"curves: {args.png}; logs: {workdir}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
