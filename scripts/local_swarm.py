"""The simulated swarm of deploy/docker-compose.yml as local processes, for machines
without Docker: DHT nodes, expert servers (each a random slice of one grid), trainers and the
swarm explorer (http://localhost:8080, ``--explorer-port``).

Usage: ``python scripts/local_swarm.py [--experts 3] [--trainers 2] [--steps 0] [--tls]``.
``--tls`` runs it over mutual TLS: certificates in ``<log-dir>/tls`` (made when missing by
``deploy/tls/make_certs.py``), one pair shared by the processes, ``client.{crt,key}`` for yours.
Ctrl-C (or SIGTERM) stops every process gracefully. Logs go to ``--log-dir``; each
process's gRPC and metrics ports are printed at start so Prometheus can scrape them.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tls_flags(folder: Path) -> list[str]:
    """Make the certificates when missing; the flags every process gets."""
    make = [sys.executable, str(ROOT / "deploy/tls/make_certs.py"), str(folder)]
    subprocess.run([*make, "--names", "local", "client"], check=True)
    return [
        "--tls-cert", str(folder / "local.crt"), "--tls-key", str(folder / "local.key"),
        "--tls-ca", str(folder / "ca.crt"), "--tls-server-name", "dmoe",
    ]  # fmt: skip


def start(name: str, service: str, args: list[str], log_dir: Path) -> tuple[subprocess.Popen, str]:
    port, metrics = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        f"services.{service}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics),
        *args,
    ]
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    print(f"{name:<12} grpc 127.0.0.1:{port}  metrics :{metrics}  log {log.name}")
    return proc, f"127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dht-nodes", type=int, default=2)
    parser.add_argument("--experts", type=int, default=3, help="expert servers")
    parser.add_argument("--experts-per-server", type=int, default=6)
    parser.add_argument("--grid", default="ffn.[0:4].[0:4]", help="expert grid pattern")
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--trainers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="trainer steps; 0: until stopped")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "benchmarks" / "out" / "swarm")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--tls", action="store_true", help="mutual TLS on every gRPC port")
    parser.add_argument("--explorer-port", type=int, default=8080,
                        help="the swarm explorer's web page (-1: no explorer)")  # fmt: skip
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    tls = tls_flags(args.log_dir / "tls") if args.tls else []
    checkpoints = args.checkpoint_dir or args.log_dir / "checkpoints"

    procs: list[subprocess.Popen] = []
    boot, boot_address = start("dht-0", "dht", [*tls], args.log_dir)
    procs.append(boot)
    peers = [boot_address]
    for i in range(1, args.dht_nodes):
        dht_args = ["--initial-peers", boot_address, *tls]
        proc, address = start(f"dht-{i}", "dht", dht_args, args.log_dir)
        procs.append(proc)
        peers.append(address)
    initial = ",".join(peers)
    for i in range(args.experts):
        expert_args = [
            "--initial-peers",
            initial,
            "--experts",
            args.grid,
            "--num-experts",
            str(args.experts_per_server),
            "--hidden-dim",
            str(args.hidden_dim),
            "--update-period",
            "5",
            "--checkpoint-dir",
            str(checkpoints / f"expert-{i}"),
            *tls,
        ]
        procs.append(start(f"expert-{i}", "expert", expert_args, args.log_dir)[0])
        time.sleep(1.0)  # each server sees the others' declarations and picks other experts
    if args.explorer_port >= 0:
        explorer_args = ["--initial-peers", initial, "--http-port", str(args.explorer_port), *tls]
        procs.append(start("explorer", "explorer", explorer_args, args.log_dir)[0])
        print(f"{'':<12} the swarm explorer: http://localhost:{args.explorer_port}")
    prefix, _, grid = args.grid.partition(".")
    shape = "x".join(str(int(r.split(":")[1].rstrip("]"))) for r in grid.split("."))
    for i in range(args.trainers):
        trainer_args = [
            "--initial-peers",
            initial,
            "--uid-prefix",
            prefix,
            "--grid",
            shape,
            "--hidden-dim",
            str(args.hidden_dim),
            "--steps",
            str(args.steps),
            "--seed",
            str(i),
            *tls,
        ]
        procs.append(start(f"trainer-{i}", "trainer", trainer_args, args.log_dir)[0])

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("swarm running; Ctrl-C stops it", flush=True)
    trainers = procs[-args.trainers :] if args.trainers else []
    while not stopping:
        if trainers and all(p.poll() is not None for p in trainers):
            break
        if any(p.poll() not in (None, 0) for p in procs):
            print("a process exited with an error; see the logs", file=sys.stderr)
            break
        time.sleep(0.5)
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    failed = [p.args[2] for p in procs if p.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
