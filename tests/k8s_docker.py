"""Run rendered Kubernetes pods as Docker containers, and probe them as the kubelet does.

A pod becomes one container per pod container with what the kubelet would give it: the command
and args (``$(VAR)`` expanded), the resolved environment, the user and groups of the
securityContext (fsGroup as a supplementary group), a read-only root filesystem, no new
privileges, no capabilities, the memory and CPU limits, emptyDir volumes (a 0777 directory per
pod, as the kubelet makes them; not their sizeLimit, which the kubelet enforces by eviction), a
volume per PersistentVolumeClaim, Secret volumes as read-only files (mode and group as the
kubelet sets them), the pod's hostname and IP (``status.podIP``). On a user-defined network
whose DNS answers the cluster's names (``dht-0.dht.<ns>.svc.cluster.local``, Services) with the
pods' IPs, with the namespace's search path and ndots:5 as a pod's resolv.conf has them.

Differences from a cluster: a ClusterIP Service name resolves to its pods' IPs (Docker's
round-robin DNS) rather than to a virtual IP, and to every pod, ready or not.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import random
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.k8s.tools.pods import (
    Pod,
    container_argv,
    container_env,
    cpu_cores,
    dns_names,
    find,
    memory_bytes,
    search_path,
)


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {result.stderr.strip()[-2000:]}")
    return result


@dataclass
class Running:
    pod: Pod
    container: dict[str, Any]
    name: str  # Docker container name
    ports: dict[int, int] = field(default_factory=dict)  # container port -> 127.0.0.1 port


class PodRunner:
    """Starts pods of one rendered manifest on a fresh Docker network; ``close`` removes all."""

    def __init__(self, objects: list[dict[str, Any]], project: str, workdir: Path) -> None:
        self.objects = objects
        self.project = project
        self.workdir = workdir
        self.network = f"{project}-net"
        self.running: list[Running] = []
        self.subnet = self._make_network()
        self._next_ip = 10

    def _make_network(self) -> ipaddress.IPv4Network:
        rng = random.Random(os.getpid())
        for _ in range(20):  # a /24 in Docker's own default range that nothing else uses
            subnet = ipaddress.ip_network(f"172.{rng.randint(18, 31)}.{rng.randint(0, 255)}.0/24")
            made = docker(
                "network",
                "create",
                "--subnet",
                str(subnet),
                "--label",
                f"dmoe-k8s-test={self.project}",
                self.network,
                check=False,
            )
            if made.returncode == 0:
                return subnet
        raise AssertionError(f"no free subnet for a Docker network: {made.stderr}")

    def start(self, pod: Pod, image_tag: str | None = None) -> list[Running]:
        pod.ip = str(self.subnet.network_address + self._next_ip)
        self._next_ip += 1
        records = dns_names(self.objects, [pod])
        aliases = [name for name, found in records.items() if pod in found]
        started = []
        for container in pod.containers():
            name = f"{self.project}-{pod.name}-{container['name']}"
            args = self._run_args(pod, container, name, aliases)
            docker("run", "-d", *args, timeout=300)
            running = Running(pod, container, name)
            for port in container.get("ports", []):
                out = docker("port", name, f"{port['containerPort']}/tcp").stdout
                running.ports[port["containerPort"]] = int(out.split()[0].rsplit(":", 1)[1])
            self.running.append(running)
            started.append(running)
        return started

    def _run_args(self, pod: Pod, container: dict, name: str, aliases: list[str]) -> list[str]:
        pod_ctx = pod.spec.get("securityContext", {})
        ctx = {**pod_ctx, **container.get("securityContext", {})}
        args = [
            "--name",
            name,
            "--hostname",
            pod.hostname,
            "--network",
            self.network,
            "--ip",
            pod.ip,
            "--label",
            f"dmoe-k8s-test={self.project}",
            "--stop-timeout",
            str(pod.spec.get("terminationGracePeriodSeconds", 30)),
        ]
        for alias in aliases:
            args += ["--network-alias", alias]
        for domain in search_path(pod.namespace):
            args += ["--dns-search", domain]
        args += ["--dns-option", "ndots:5"]
        if "runAsUser" in ctx:
            args += ["--user", f"{ctx['runAsUser']}:{ctx.get('runAsGroup', 0)}"]
        if "fsGroup" in pod_ctx:
            args += ["--group-add", str(pod_ctx["fsGroup"])]
        if ctx.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if ctx.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for cap in ctx.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", cap]
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", str(memory_bytes(limits["memory"]))]
        if "cpu" in limits:
            cpus = min(cpu_cores(limits["cpu"]), os.cpu_count() or 1)
            args += ["--cpus", f"{cpus:g}"]
        for mount in container.get("volumeMounts", []):
            args += self._mount(pod, mount)
        for port in container.get("ports", []):
            args += ["-p", f"127.0.0.1::{port['containerPort']}"]
        env = container_env(self.objects, pod, container, image_env=False)
        env.pop("HOSTNAME", None)  # --hostname sets it, as the kubelet does
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        words = container_argv(self.objects, pod, container)
        return [*args, "--entrypoint", words[0], container["image"], *words[1:]]

    def _mount(self, pod: Pod, mount: dict[str, Any]) -> list[str]:
        volume = pod.volume(mount["name"])
        assert volume is not None, mount
        target, ro = mount["mountPath"], ",readonly" if mount.get("readOnly") else ""
        if "emptyDir" in volume:
            return [
                "--mount",
                f"type=bind,source={self._empty_dir(pod, volume)},destination={target}",
            ]
        if "persistentVolumeClaim" in volume:
            source = f"{self.project}-{mount['name']}-{pod.name}"
            return ["--mount", f"type=volume,source={source},destination={target}{ro}"]
        if "secret" in volume or "configMap" in volume:
            return [
                "--mount",
                f"type=bind,source={self._files(pod, volume)},destination={target},readonly",
            ]
        raise AssertionError(f"volume kind not emulated: {volume}")

    def _empty_dir(self, pod: Pod, volume: dict[str, Any]) -> str:
        """An emptyDir as the kubelet makes one: a directory of the pod, mode 0777 (group
        fsGroup, setgid, when set), kept across container restarts. Not a tmpfs: Docker gives
        a tmpfs the mode of the image's directory at that path (``/data/checkpoints``: 0755,
        root), so a non-root pod could not write its checkpoints there."""
        folder = self.workdir / f"{pod.name}-{volume['name']}"
        folder.mkdir(parents=True, exist_ok=True)
        group = pod.spec.get("securityContext", {}).get("fsGroup")
        if group is not None:
            os.chown(folder, 0, group)
        folder.chmod(0o2777 if group is not None else 0o777)
        return str(folder)

    def _files(self, pod: Pod, volume: dict[str, Any]) -> str:
        """A Secret or ConfigMap volume's files, with the kubelet's mode and group."""
        kind, key = ("Secret", "secret") if "secret" in volume else ("ConfigMap", "configMap")
        source = volume[key]
        obj = find(
            self.objects, kind, source.get("secretName") or source.get("name"), pod.namespace
        )
        assert obj is not None, source
        folder = self.workdir / f"{pod.name}-{volume['name']}"
        folder.mkdir(parents=True, exist_ok=True)
        mode = source.get("defaultMode", 0o644)
        group = pod.spec.get("securityContext", {}).get("fsGroup")
        for name, value in (obj.get("data") or {}).items():
            path = folder / name
            path.write_bytes(base64.b64decode(value) if kind == "Secret" else value.encode())
            if group is not None:
                os.chown(path, 0, group)
                mode |= 0o440 if kind == "Secret" else 0o444  # group-readable under fsGroup
            path.chmod(mode)
        folder.chmod(0o755)
        return str(folder)

    def logs(self, running: Running) -> str:
        out = docker("logs", "--tail", "40", running.name, check=False)
        return out.stdout + out.stderr

    def state(self, running: Running) -> str:
        return docker(
            "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", running.name
        ).stdout.strip()

    def close(self) -> None:
        ids = docker("ps", "-aq", "--filter", f"label=dmoe-k8s-test={self.project}").stdout.split()
        if ids:
            docker("rm", "-f", "-v", *ids, check=False, timeout=180)
        volumes = docker("volume", "ls", "-q", "--filter", f"name={self.project}-").stdout.split()
        if volumes:
            docker("volume", "rm", *volumes, check=False)
        docker("network", "rm", self.network, check=False)


# ---------------------------------------------------------------- the kubelet's probes


def run_probe(runner: PodRunner, running: Running, probe: dict[str, Any]) -> tuple[bool, str]:
    """One probe as the kubelet runs it: (passed, why)."""
    timeout = probe.get("timeoutSeconds", 1)
    if "grpc" in probe:  # grpc.health.v1 Check, plaintext, the probe's service name
        port = runner_port(running, probe["grpc"]["port"])
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                    timeout=timeout,
                )
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        return serving, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if "exec" in probe:  # in the container, as its user
        try:
            done = docker(
                "exec", running.name, *probe["exec"]["command"], check=False, timeout=timeout + 5
            )
        except subprocess.TimeoutExpired:
            return False, "timed out"
        return done.returncode == 0, (done.stdout + done.stderr).strip()[-300:]
    if "httpGet" in probe:
        get = probe["httpGet"]
        port = runner_port(running, get["port"])
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}{get.get('path', '/')}", timeout=timeout
            ) as reply:
                return 200 <= reply.status < 400, str(reply.status)
        except OSError as exc:
            return False, str(exc)
    raise AssertionError(f"probe kind not emulated: {probe}")


def runner_port(running: Running, port: int | str) -> int:
    for declared in running.container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return running.ports[declared["containerPort"]]
    raise AssertionError(f"{running.name}: no port {port}")


def probe_until(
    runner: PodRunner, running: Running, kind: str, *, alive: Callable[[], bool] | None = None
) -> float:
    """Probe ``kind`` on the kubelet's schedule until it passes; return the seconds it took.

    Fails as the kubelet would act: a startup or liveness probe that fails failureThreshold
    times in a row would have the container killed; a container that exits fails at once.
    Readiness gets the same budget (a pod that never becomes ready serves no one).
    """
    probe = running.container[kind]
    period = probe.get("periodSeconds", 10)
    threshold = probe.get("failureThreshold", 3)
    started = time.monotonic()
    time.sleep(probe.get("initialDelaySeconds", 0))
    failures, why = 0, ""
    while True:
        state = runner.state(running)
        if not state.startswith("running"):
            raise AssertionError(f"{running.name} exited ({state}):\n{runner.logs(running)}")
        ok, why = run_probe(runner, running, probe)
        if ok:
            return time.monotonic() - started
        failures += 1
        if failures >= threshold:
            raise AssertionError(
                f"{running.name} {kind}: {failures} failures in a row (the kubelet would "
                f"{'restart it' if kind != 'readinessProbe' else 'never route to it'}); last: "
                f"{why}\n{runner.logs(running)}"
            )
        time.sleep(period)
