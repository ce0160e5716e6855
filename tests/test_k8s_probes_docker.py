"""The Kubernetes pods for real, in Docker: probes as the kubelet runs them, DNS names as
the cluster gives them (issue 10).

Renders an overlay (with the images tests/test_swarm_docker.py builds offline), starts the
three DHT pods, the first expert pod and a trainer pod as containers with exactly their
rendered command, environment, user, read-only root, volumes, limits, ports, hostname and
pod IP (tests/k8s_docker.py), on a network whose DNS answers the StatefulSet pod names
(dht-0.dht.dmoe.svc.cluster.local, and the short forms through the namespace's search path)
and the Services. Then each container's startup probe must pass within its budget
(failureThreshold x periodSeconds), then readiness and liveness, called as the kubelet calls
them (grpc.health.v1 Check on the probe's port with the probe's service name; exec probes in
the container). The DHT nodes must find each other through the names the manifests give,
the expert must declare its experts, the trainer must train on them, and Prometheus's
scrape annotation must point at a working /metrics. With mutual TLS (components/tls) the same
pods pass their exec probes, and a plaintext probe (what a kubelet gRPC probe would be) is
refused.

Also: a plain `docker-compose up` in deploy/ creates the monitoring services (deploy/.env).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_docker import PodRunner, Running, docker, probe_until, run_probe
from test_swarm_docker import TAG, sh, wait_for

from deploy.k8s.tools.pods import Pod, pods
from deploy.k8s.tools.render import render

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]
IMAGES = ("dmoe-dht", "dmoe-expert", "dmoe-trainer")


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = sh("deploy/offline/ensure-docker.sh", timeout=900).strip().splitlines()[-1]
    sh("deploy/offline/build-images.sh", TAG, timeout=1200)  # cached layers: seconds
    return command.split()


def rendered(tmp_path: Path, *components: str) -> list[dict[str, Any]]:
    """overlays/cpu (+ components) with the images built here (tag e2e)."""
    tree = tmp_path / "tree"
    shutil.copytree(
        ROOT / "deploy/k8s", tree / "deploy/k8s", ignore=shutil.ignore_patterns("certs")
    )
    shutil.copytree(ROOT / "deploy/grafana", tree / "deploy/grafana")
    if "tls" in components:
        make = [
            sys.executable,
            "deploy/tls/make_certs.py",
            str(tree / "deploy/k8s/components/tls/certs"),
            "--names",
            "dht",
            "expert",
            "trainer",
            "client",  # the explorer's pair (components/tls)
        ]
        sh(*make)
    overlay = tree / "deploy/k8s/test-overlay"
    overlay.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "dmoe",
        "resources": ["../base"],
        "components": [
            "../components/monitoring",
            *[f"../components/{c}" for c in components],
            "../components/images",
        ],
        "images": [{"name": image, "newTag": TAG} for image in IMAGES],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(overlay)


@pytest.fixture
def runner(compose: list[str], tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    made: list[PodRunner] = []

    def make(objects: list[dict[str, Any]]) -> PodRunner:
        project = f"dmoe-k8s-{os.getpid()}-{len(made)}"
        made.append(PodRunner(objects, project, tmp_path / project))
        return made[-1]

    yield make
    for runner in made:
        runner.close()
        left = docker("ps", "-aq", "--filter", f"label=dmoe-k8s-test={runner.project}").stdout
        assert not left.split(), f"containers left behind: {left}"


def swarm_pods(objects: list[dict[str, Any]]) -> list[Pod]:
    """The three DHT pods, the first expert pod, the first trainer pod."""
    chosen = [p for p in pods(objects) if p.labels.get("app.kubernetes.io/name") == "dht"]
    for name in ("expert", "trainer"):
        chosen.append(
            next(p for p in pods(objects) if p.labels.get("app.kubernetes.io/name") == name)
        )
    return chosen


def start_and_probe(runner: PodRunner, chosen: list[Pod]) -> dict[str, dict[str, float]]:
    """Start every pod, then probe each container as the kubelet would, all concurrently:
    startup until it passes within its budget, then readiness, then liveness."""
    started: list[Running] = []
    for pod in chosen:
        started += runner.start(pod)

    def lifecycle(running: Running) -> dict[str, float]:
        times = {}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in running.container:
                times[kind] = probe_until(runner, running, kind)
        return times

    with ThreadPoolExecutor(len(started)) as pool:
        results = dict(
            zip([r.pod.name for r in started], pool.map(lifecycle, started), strict=True)
        )
    return results


def metric(runner: PodRunner, running: Running, name: str) -> float | None:
    """A sample from the port the pod's prometheus.io/port annotation names."""
    port = running.ports[int(running.pod.annotations["prometheus.io/port"])]
    path = running.pod.annotations.get("prometheus.io/path", "/metrics")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        text = reply.read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


def test_pods_pass_their_probes_and_find_each_other_by_name(runner: Any, tmp_path: Path) -> None:
    started_at = time.monotonic()
    objects = rendered(tmp_path)
    pod_runner: PodRunner = runner(objects)
    chosen = swarm_pods(objects)
    times = start_and_probe(pod_runner, chosen)
    print(f"probes passed (s since each probe began): {times}")
    by_name = {r.pod.name: r for r in pod_runner.running}

    # the DHT nodes found each other through dht-N.dht names: each lists the other two
    # (by the pod IPs they announce, DMOE_ANNOUNCE_HOST = status.podIP)
    dht = [by_name[p.name] for p in chosen if p.name.startswith("dht-")]
    for node in dht:
        wait_for(
            f"{node.pod.name} routing table of 2",
            lambda node=node: metric(pod_runner, node, "dmoe_dht_routing_table_peers") == 2,
            120,
        )
    # the expert declared its experts (it is ready only then) through dht-client, and the
    # trainer, also through dht-client, finds and trains them
    expert = by_name[next(p.name for p in chosen if p.name.startswith("expert-"))]
    trainer = next(r for r in pod_runner.running if r.pod.name.startswith("trainer-"))
    assert metric(pod_runner, expert, "dmoe_build_info") == 1
    wait_for(
        "trainer steps",
        lambda: (metric(pod_runner, trainer, "dmoe_trainer_steps_total") or 0) >= 5,
        180,
    )
    # the expert's identity and uid choice live on its volume (the PVC), under its pod name
    listing = docker("exec", expert.name, "ls", "/data/checkpoints/hosts").stdout.split()
    assert {"expert-0.json", "expert-0.key"} <= set(listing), listing

    # the trainer (non-root, read-only root filesystem) checkpoints onto its emptyDir, and goes on
    def checkpointed() -> bool:
        state = pod_runner.state(trainer)
        assert state == "running 0", f"{trainer.name}: {state}\n{pod_runner.logs(trainer)}"
        listing = docker("exec", trainer.name, "ls", "/data/checkpoints", check=False).stdout
        return "trainer.pt" in listing.split()

    wait_for("trainer checkpoint", checkpointed, 180)
    assert pod_runner.state(trainer) == "running 0"
    print(f"k8s probe test (plaintext): {time.monotonic() - started_at:.0f} s")


def test_tls_pods_pass_exec_probes_and_refuse_plaintext(runner: Any, tmp_path: Path) -> None:
    started_at = time.monotonic()
    objects = rendered(tmp_path, "tls")
    pod_runner: PodRunner = runner(objects)
    chosen = [p for p in swarm_pods(objects) if not p.name.startswith("trainer")]
    times = start_and_probe(pod_runner, chosen)
    print(f"exec probes passed: {times}")
    for running in pod_runner.running:
        port = running.container["ports"][0]["containerPort"]
        # what a kubelet gRPC probe would send: plaintext; the mTLS port refuses it
        ok, why = run_probe(pod_runner, running, {"grpc": {"port": port}, "timeoutSeconds": 5})
        assert not ok and "UNAVAILABLE" in why, (running.name, why)
    dht = [r for r in pod_runner.running if r.pod.name.startswith("dht-")]
    for node in dht:
        wait_for(
            f"{node.pod.name} routing table of 2 over mTLS",
            lambda node=node: metric(pod_runner, node, "dmoe_dht_routing_table_peers") == 2,
            120,
        )
    print(f"k8s probe test (mTLS): {time.monotonic() - started_at:.0f} s")


def test_plain_compose_up_in_deploy_includes_monitoring(compose: list[str]) -> None:
    """deploy/.env sets COMPOSE_PROFILES=monitoring: `up` without flags creates Prometheus
    and Grafana too (created, not started: the check needs no Grafana image offline)."""
    project = f"dmoe-env-{os.getpid()}"
    env = {
        **os.environ,
        "DMOE_TAG": TAG,
        "DMOE_PROMETHEUS_IMAGE": f"dmoe-prometheus:{TAG}",
        "DMOE_GRAFANA_IMAGE": f"dmoe-prometheus:{TAG}",
    }
    env.pop("COMPOSE_PROFILES", None)
    base = [*compose, "-p", project]
    try:
        done = subprocess.run(
            [*base, "up", "--no-start", "--no-build"],
            cwd=ROOT / "deploy",
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        created = docker(
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={project}",
            "--format",
            '{{.Label "com.docker.compose.service"}}',
        ).stdout.split()
        assert {"prometheus", "grafana", "dht-bootstrap", "expert", "trainer"} <= set(created)
    finally:
        subprocess.run(
            [*base, "down", "-v", "--remove-orphans"],
            cwd=ROOT / "deploy",
            env=env,
            capture_output=True,
            timeout=300,
        )
