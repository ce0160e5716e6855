"""Chaos for the simulated swarm: kill and restart expert containers, add latency and loss.

Uses the Docker SDK against a running compose project (``deploy/swarm.sh up``):

    python deploy/chaos.py kill [--count 1] [--restart-after 20]
    python deploy/chaos.py netem --latency-ms 100 [--jitter-ms 10] [--loss 0.05]
    python deploy/chaos.py netem --clear
    python deploy/chaos.py run --kill-every 60 --down-for 20 [--latency-ms 50 --loss 0.02]

``netem`` runs ``tc qdisc replace dev eth0 root netem ...`` as root inside each container of the
service (the images ship iproute2; compose gives the expert service NET_ADMIN). A restarted
container comes back with a fresh network namespace, so ``run`` applies netem again after each
restart. Every command prints one JSON line per action, for scripts and tests. On a kernel
built without netem (some VM kernels) ``netem`` exits with status 3 and says so.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Any

import docker
from docker.models.containers import Container

NO_NETEM = 3  # exit status when the kernel cannot shape traffic


def containers(
    client: docker.DockerClient, project: str, service: str, running: bool = True
) -> list[Container]:
    labels = [f"com.docker.compose.project={project}", f"com.docker.compose.service={service}"]
    found = client.containers.list(all=not running, filters={"label": labels})
    return sorted(found, key=lambda c: c.name)


def report(action: str, container: Container, **fields: Any) -> None:
    line = {"ts": round(time.time(), 3), "action": action, "container": container.name, **fields}
    print(json.dumps(line), flush=True)


def netem(
    container: Container, latency_ms: float, jitter_ms: float, loss: float, clear: bool
) -> None:
    """Shape the container's egress with tc netem (or remove the shaping)."""
    if clear:
        command = ["tc", "qdisc", "del", "dev", "eth0", "root"]
    else:
        command = ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem"]
        if latency_ms > 0:
            command += ["delay", f"{latency_ms}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else [])
        if loss > 0:
            command += ["loss", f"{loss * 100:g}%"]
        if len(command) == 7:
            raise SystemExit("netem needs --latency-ms or --loss (or --clear)")
    code, output = container.exec_run(command, user="root")
    if code != 0 and b"qdisc kind is unknown" in output:
        print(
            f"{container.name}: this host's kernel has no netem (sch_netem), so latency and "
            "loss cannot be shaped here; use the expert runtime's own injection instead "
            "(DMOE_SIMULATE_LATENCY_MS, DMOE_SIMULATE_FAILURE_RATE)",
            file=sys.stderr,
        )
        raise SystemExit(NO_NETEM)
    if code != 0 and not (clear and b"No such file" in output):
        raise SystemExit(f"{container.name}: {' '.join(command)} failed: {output.decode()}")
    report("netem", container, command=" ".join(command))


def kill(victims: list[Container]) -> None:
    for container in victims:
        container.kill()
        report("kill", container)


def restart(victims: list[Container]) -> None:
    for container in victims:
        container.start()
        report("start", container)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default="dmoe", help="compose project (default: %(default)s)")
    parser.add_argument("--service", default="expert", help="service to disturb")
    parser.add_argument("--seed", type=int, default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kill", help="kill random containers of the service")
    k.add_argument("--count", type=int, default=1)
    k.add_argument("--restart-after", type=float, default=-1, help="seconds; < 0: leave down")
    n = sub.add_parser("netem", help="add latency and loss to every container of the service")
    r = sub.add_parser("run", help="keep killing, restarting and shaping until stopped")
    r.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    r.add_argument("--down-for", type=float, default=20.0, help="seconds a victim stays down")
    r.add_argument("--duration", type=float, default=0.0, help="seconds; 0: until Ctrl-C")
    for p in (n, r):
        p.add_argument("--latency-ms", type=float, default=0.0)
        p.add_argument("--jitter-ms", type=float, default=0.0)
        p.add_argument("--loss", type=float, default=0.0, help="fraction of packets, e.g. 0.05")
    n.add_argument("--clear", action="store_true", help="remove the shaping")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    client = docker.from_env()
    alive = containers(client, args.project, args.service)
    if not alive:
        print(f"no running {args.service} container in project {args.project}", file=sys.stderr)
        return 1
    if args.command == "netem":
        for container in alive:
            netem(container, args.latency_ms, args.jitter_ms, args.loss, args.clear)
        return 0
    if args.command == "kill":
        victims = rng.sample(alive, min(args.count, len(alive)))
        kill(victims)
        if args.restart_after >= 0:
            time.sleep(args.restart_after)
            restart(victims)
        return 0

    shaping = args.latency_ms > 0 or args.loss > 0
    if shaping:
        for container in alive:
            netem(container, args.latency_ms, args.jitter_ms, args.loss, False)
    deadline = time.monotonic() + args.duration if args.duration > 0 else float("inf")
    try:
        while time.monotonic() < deadline:
            time.sleep(min(args.kill_every, max(deadline - time.monotonic(), 0)))
            alive = containers(client, args.project, args.service)
            if len(alive) < 2:  # never take the last one down
                continue
            victim = rng.choice(alive)
            kill([victim])
            time.sleep(args.down_for)
            restart([victim])
            if shaping:
                time.sleep(1.0)
                victim.reload()
                netem(victim, args.latency_ms, args.jitter_ms, args.loss, False)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
