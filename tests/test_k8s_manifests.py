"""The Kubernetes manifests (deploy/k8s), checked without a cluster (issue 10).

Every overlay, and the components composed as the docs show, renders with the pinned
kubectl (kustomize) and validates strictly (unknown fields are errors) against the official
schemas of every Kubernetes version from the oldest to the newest supported, the
ServiceMonitor against the Prometheus Operator's schema. The cross-object checks
(deploy/k8s/tools/checks.py: selectors, ports, probes, DNS names, references, the services'
own argument parsers, volumes, security, GPUs, monitoring) find nothing, and each one rejects a
manifest broken the way it guards against. The Grafana ConfigMap is the compose swarm's
dashboards byte for byte. tests/test_k8s_probes_docker.py runs the pods for real.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.k8s.tools import checks, schema
from deploy.k8s.tools.render import render

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
Objects = list[dict[str, Any]]
OVERLAYS = {"cpu": False, "gpu": True, "tls": False}  # overlay -> expert pods on GPUs


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s and deploy/grafana with TLS certificates made (as the docs say)."""
    root = tmp_path_factory.mktemp("k8s")
    shutil.copytree(K8S, root / "deploy/k8s", ignore=shutil.ignore_patterns("certs"))
    shutil.copytree(ROOT / "deploy/grafana", root / "deploy/grafana")
    certs = root / "deploy/k8s/components/tls/certs"
    make = [
        sys.executable,
        "deploy/tls/make_certs.py",
        str(certs),
        "--names",
        "dht",
        "expert",
        "trainer",
        "client",
    ]
    subprocess.run(make, cwd=ROOT, check=True, capture_output=True)
    # the compositions the docs describe: GPUs with TLS, and the Prometheus Operator's way
    compose = {
        "gpu-tls": ["gpu", "monitoring", "tls", "images"],
        "operator": ["service-monitor", "images"],
    }
    for name, components in compose.items():
        folder = root / "deploy/k8s/overlays" / name
        folder.mkdir()
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": "dmoe",
            "resources": ["../../base"],
            "components": [f"../../components/{c}" for c in components],
        }
        (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return root / "deploy/k8s"


ALL = {**OVERLAYS, "gpu-tls": True, "operator": False}


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, Objects]:
    return {name: render(tree / "overlays" / name) for name in ALL}


def kinds(objects: Objects) -> list[str]:
    return sorted(o["kind"] for o in objects)


def test_overlays_render_with_the_whole_swarm(rendered: dict[str, Objects]) -> None:
    swarm = [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "Deployment",  # the explorer
        "Namespace",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "Service",
        "Service",
        "Service",  # the explorer
        "StatefulSet",
        "StatefulSet",
    ]
    monitoring = ["ConfigMap"] * 4 + ["Deployment"] * 2 + ["Role", "RoleBinding"]
    monitoring += ["Service"] * 2 + ["ServiceAccount"]
    assert kinds(rendered["cpu"]) == sorted(swarm + monitoring)
    assert kinds(rendered["gpu"]) == kinds(rendered["cpu"])
    assert kinds(rendered["tls"]) == sorted(swarm + monitoring + ["Secret"] * 4)
    assert kinds(rendered["operator"]) == sorted([*swarm, "ServiceMonitor"])
    for objects in rendered.values():
        for obj in objects:
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == "dmoe", obj["metadata"]["name"]


def test_every_object_validates_against_every_supported_kubernetes(
    rendered: dict[str, Objects],
) -> None:
    versions = schema.versions()
    assert versions[0] == "1.25" and len(versions) >= 13, versions
    started = time.monotonic()
    errors = [
        e
        for objects in rendered.values()
        for v in versions
        for e in schema.validate_all(objects, v)
    ]
    assert not errors, "\n".join(errors[:20])
    print(
        f"{sum(map(len, rendered.values()))} objects x {len(versions)} versions: "
        f"{time.monotonic() - started:.2f} s"
    )


def test_strict_schemas_reject_unknown_fields(rendered: dict[str, Objects]) -> None:
    objects = copy.deepcopy(rendered["operator"])
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "5s"
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    errors = schema.validate_all(objects, "1.37")
    assert any("ServiceMonitor" in e and "intervall" in e for e in errors), errors
    assert any("StatefulSet" in e and "readinessprobe" in e for e in errors), errors
    assert schema.errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}}, "1.37")


@pytest.mark.parametrize("name", sorted(ALL))
def test_cross_object_checks_pass(rendered: dict[str, Objects], name: str) -> None:
    started = time.monotonic()
    found = checks.problems(rendered[name], gpu=ALL[name])
    assert not found, "\n".join(found)
    print(f"{name}: {len(checks.names())} checks in {time.monotonic() - started:.2f} s")


# ---------------------------------------------------------------- each check rejects


def workload(objects: Objects, name: str) -> dict[str, Any]:
    return next(
        o
        for o in objects
        if o["kind"] in ("StatefulSet", "Deployment") and o["metadata"]["name"] == name
    )


def container(objects: Objects, name: str) -> dict[str, Any]:
    return workload(objects, name)["spec"]["template"]["spec"]["containers"][0]


def service(objects: Objects, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == name)


def set_env(objects: Objects, name: str, var: str, value: str) -> None:
    env = container(objects, name)["env"]
    env[:] = [e for e in env if e["name"] != var] + [{"name": var, "value": value}]


def configmap(objects: Objects, prefix: str) -> dict[str, Any]:
    return next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(prefix)
    )


Break = Callable[[Objects], None]
BROKEN: dict[str, tuple[str, str, Break]] = {
    # name: (overlay, expected problem text, how the manifest is broken)
    "bad value": (
        "cpu",
        "flags: StatefulSet/expert",
        lambda o: configmap(o, "dmoe-swarm")["data"].update({"hidden-dim": "sixty"}),
    ),
    "unknown variable": (
        "cpu",
        "DMOE_HIDEN_DIM: no such flag",
        lambda o: set_env(o, "trainer", "DMOE_HIDEN_DIM", "64"),
    ),
    "explorer without peers": (
        "cpu",
        "flags: Deployment/explorer container explorer: no --initial-peers",
        lambda o: set_env(o, "explorer", "DMOE_INITIAL_PEERS", ""),
    ),
    "explorer probe on the page's port": (
        "cpu",
        "ports: Deployment/explorer container explorer: livenessProbe probes 8080",
        lambda o: container(o, "explorer")["livenessProbe"]["grpc"].update(port=8080),
    ),
    "unknown argument": (
        "cpu",
        "unrecognized arguments: --hidden-dimm",
        lambda o: container(o, "dht").update(args=["--hidden-dimm", "3"]),
    ),
    "bad grid": (
        "cpu",
        "flags: StatefulSet/expert",
        lambda o: configmap(o, "dmoe-swarm")["data"].update({"experts": "ffn.[0:4"}),
    ),
    "selector": (
        "cpu",
        "selectors: StatefulSet/dht",
        lambda o: workload(o, "dht")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "dhts"}
        ),
    ),
    "service selector": (
        "cpu",
        "selectors: Service/dht-client",
        lambda o: service(o, "dht-client")["spec"]["selector"].update(
            {"app.kubernetes.io/name": "dhtt"}
        ),
    ),
    "target port": (
        "cpu",
        "service-ports: Service/expert port metrics",
        lambda o: service(o, "expert")["spec"]["ports"][1].update(targetPort="metric"),
    ),
    "probe port": (
        "cpu",
        "probes: StatefulSet/expert container expert readinessProbe: port 31341",
        lambda o: container(o, "expert")["readinessProbe"]["grpc"].update(port=31341),
    ),
    "named grpc port": (
        "cpu",
        "gRPC probes take a port number",
        lambda o: container(o, "dht")["livenessProbe"]["grpc"].update(port="grpc"),
    ),
    "two handlers": (
        "cpu",
        "2 handlers",
        lambda o: container(o, "trainer")["startupProbe"].update(tcpSocket={"port": 31350}),
    ),
    "health service": (
        "cpu",
        "health service 'dmoe.Dht'",
        lambda o: container(o, "dht")["startupProbe"]["grpc"].update(service="dmoe.Dht"),
    ),
    "port flag": (
        "cpu",
        "port grpc is 31340, the process binds 31341",
        lambda o: set_env(o, "expert", "DMOE_PORT", "31341"),
    ),
    "scrape port": (
        "cpu",
        "prometheus.io/port 9331",
        lambda o: workload(o, "dht")["spec"]["template"]["metadata"]["annotations"].update(
            {"prometheus.io/port": "9331"}
        ),
    ),
    "serviceName": (
        "cpu",
        "serviceName 'dhts' is no Service",
        lambda o: workload(o, "dht")["spec"].update(serviceName="dhts"),
    ),
    "headless": (
        "cpu",
        "Service/expert is not headless",
        lambda o: service(o, "expert")["spec"].update(clusterIP="10.0.0.9"),
    ),
    "peer ordinal": (
        "cpu",
        "dht-3.dht:31330: no such name",
        lambda o: set_env(o, "dht", "DMOE_INITIAL_PEERS", "dht-0.dht:31330,dht-3.dht:31330"),
    ),
    "peer service": (
        "cpu",
        "dht-clinet:31330: no such name",
        lambda o: set_env(o, "expert", "DMOE_INITIAL_PEERS", "dht-clinet:31330"),
    ),
    "peer port": (
        "cpu",
        "dht-client:31331: dht-0 has no such port",
        lambda o: set_env(o, "trainer", "DMOE_INITIAL_PEERS", "dht-client:31331"),
    ),
    "configmap key": (
        "cpu",
        "has no key hidden_dim",
        lambda o: next(e for e in container(o, "trainer")["env"] if e["name"] == "DMOE_HIDDEN_DIM")[
            "valueFrom"
        ]["configMapKeyRef"].update(key="hidden_dim"),
    ),
    "value and valueFrom": (
        "cpu",
        "env DMOE_ANNOUNCE_HOST has both value and valueFrom",
        lambda o: next(
            e for e in container(o, "dht")["env"] if e["name"] == "DMOE_ANNOUNCE_HOST"
        ).update(value="x"),
    ),
    "service links": (
        "cpu",
        "Service/dmoe-api would set DMOE_API_PORT",
        lambda o: (
            workload(o, "expert")["spec"]["template"]["spec"].pop("enableServiceLinks"),
            o.append(
                {
                    **copy.deepcopy(service(o, "expert")),
                    "metadata": {"name": "dmoe-api", "namespace": "dmoe"},
                }
            ),
        ),
    ),
    "checkpoint volume": (
        "cpu",
        "checkpoints /data/other is not on a writable volume",
        lambda o: set_env(o, "expert", "DMOE_CHECKPOINT_DIR", "/data/other"),
    ),
    "identity on root": (
        "cpu",
        "identity /home/dmoe/.local/share/dmoe/dht-31330.key",
        lambda o: container(o, "dht")["env"].remove(
            {"name": "DMOE_IDENTITY_FILE", "value": "/var/lib/dmoe/dht.key"}
        ),
    ),
    "expert state off the PVC": (
        "cpu",
        "is not on the pod's PersistentVolumeClaim",
        lambda o: set_env(o, "expert", "DMOE_CHECKPOINT_DIR", "/tmp/c"),
    ),
    "tls file": (
        "tls",
        "/run/dmoe-tls/tls.pem: ",
        lambda o: set_env(o, "trainer", "DMOE_TLS_CERT", "/run/dmoe-tls/tls.pem"),
    ),
    "runAsUser": (
        "cpu",
        "no numeric runAsUser",
        lambda o: workload(o, "trainer")["spec"]["template"]["spec"]["securityContext"].pop(
            "runAsUser"
        ),
    ),
    "writable root": (
        "cpu",
        "root filesystem is writable",
        lambda o: container(o, "grafana")["securityContext"].pop("readOnlyRootFilesystem"),
    ),
    "hostPath": (
        "cpu",
        "volume tmp: not allowed",
        lambda o: (
            workload(o, "dht")["spec"]["template"]["spec"]["volumes"][1].update(
                {"hostPath": {"path": "/tmp"}}, emptyDir=None
            )
            or workload(o, "dht")["spec"]["template"]["spec"]["volumes"][1].pop("emptyDir")
        ),
    ),
    "limits": (
        "cpu",
        "no limits.memory",
        lambda o: container(o, "prometheus")["resources"]["limits"].pop("memory"),
    ),
    "grace": (
        "cpu",
        "termination: StatefulSet/expert: 20 s to stop",
        lambda o: workload(o, "expert")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=20
        ),
    ),
    "grid": (
        "cpu",
        "looks for ffn.[0:8].[0:8]",
        lambda o: configmap(o, "dmoe-swarm")["data"].update(grid="8x8"),
    ),
    "experts per server": (
        "cpu",
        "24 experts per server, the grid has 16",
        lambda o: configmap(o, "dmoe-swarm")["data"].update({"experts-per-server": "24"}),
    ),
    "gpu limit": (
        "gpu",
        "no nvidia.com/gpu limit",
        lambda o: container(o, "expert")["resources"]["limits"].pop("nvidia.com/gpu"),
    ),
    "gpu request": (
        "gpu",
        "requests nvidia.com/gpu 2 but limits 1",
        lambda o: container(o, "expert")["resources"]["requests"].update({"nvidia.com/gpu": 2}),
    ),
    "gpu taint": (
        "gpu",
        "does not tolerate the nvidia.com/gpu taint",
        lambda o: workload(o, "expert")["spec"]["template"]["spec"].pop("tolerations"),
    ),
    "gpu image": (
        "gpu",
        "is not the CUDA build",
        lambda o: container(o, "expert").update(image="dmoe-expert:latest"),
    ),
    "gpu device": ("gpu", "--device cpu", lambda o: set_env(o, "expert", "DMOE_DEVICE", "cpu")),
    "gpu on cpu": (
        "cpu",
        "gpu: StatefulSet/expert container expert: asks for a GPU",
        lambda o: container(o, "expert")["resources"]["limits"].update({"nvidia.com/gpu": 1}),
    ),
    "gpu elsewhere": (
        "gpu",
        "gpu: Deployment/trainer container trainer: asks for a GPU",
        lambda o: container(o, "trainer")["resources"]["limits"].update({"nvidia.com/gpu": 1}),
    ),
    "monitor port": (
        "operator",
        "no selected Service has port 'metric'",
        lambda o: next(x for x in o if x["kind"] == "ServiceMonitor")["spec"]["endpoints"][
            0
        ].update(port="metric"),
    ),
    "monitor selector": (
        "operator",
        "selects no Service",
        lambda o: next(x for x in o if x["kind"] == "ServiceMonitor")["spec"]["selector"][
            "matchLabels"
        ].update({"app.kubernetes.io/part-of": "x"}),
    ),
    "scraped twice": (
        "operator",
        "is scraped through 2 Services",
        lambda o: service(o, "dht-client")["spec"]["ports"].append(
            {"name": "metrics", "port": 9330, "targetPort": "metrics"}
        ),
    ),
    "prometheus rbac": (
        "cpu",
        "may not list pods",
        lambda o: next(x for x in o if x["kind"] == "Role")["rules"][0].update(verbs=["get"]),
    ),
    "dashboard job": (
        "cpu",
        "dashboards query job 'trainer'",
        lambda o: workload(o, "trainer")["spec"]["template"]["metadata"]["annotations"].update(
            {"prometheus.io/scrape": "false"}
        ),
    ),
    "grafana mount": (
        "cpu",
        "Grafana has no dashboards ConfigMap",
        lambda o: container(o, "grafana")["volumeMounts"][-1].update(
            mountPath="/var/lib/grafana/boards"
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_check_rejects_a_broken_manifest(rendered: dict[str, Objects], case: str) -> None:
    overlay, expected, breaks = BROKEN[case]
    objects = copy.deepcopy(rendered[overlay])
    breaks(objects)
    found = checks.problems(objects, gpu=ALL[overlay])
    assert any(expected in p for p in found), f"{case}: expected {expected!r} in\n" + "\n".join(
        found
    )


def test_every_check_has_a_broken_manifest(rendered: dict[str, Objects]) -> None:
    """Which check reports each broken case: together, all of them."""
    rejecting = set()
    for overlay, expected, breaks in BROKEN.values():
        objects = copy.deepcopy(rendered[overlay])
        breaks(objects)
        for name, check in checks.CHECKS.items():
            if any(expected in p for p in check(objects)):
                rejecting.add(name)
        if any(expected in p for p in checks.check_gpu(objects, ALL[overlay])):
            rejecting.add("gpu")
    assert rejecting == set(checks.names())


# ---------------------------------------------------------------- the GPU overlay, in detail


def test_gpu_overlay_puts_experts_on_gpus_and_nothing_else(rendered: dict[str, Objects]) -> None:
    gpu, cpu = rendered["gpu"], rendered["cpu"]
    expert = container(gpu, "expert")
    assert expert["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert expert["image"].startswith("dmoe-expert-cuda:")
    env = {e["name"]: e.get("value") for e in expert["env"]}
    assert env["DMOE_DEVICE"] == "cuda" and env["DMOE_COMPUTE_THREADS"] == "1"
    tolerations = workload(gpu, "expert")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    for name in ("dht", "trainer", "prometheus", "grafana"):
        assert "tolerations" not in workload(gpu, name)["spec"]["template"]["spec"], name
        assert container(gpu, name) == container(cpu, name), name
    assert "nvidia.com/gpu" not in str(cpu)
    assert {e["name"]: e.get("value") for e in container(cpu, "expert")["env"]}[
        "DMOE_DEVICE"
    ] == "auto"


# ---------------------------------------------------------------- Grafana, images


def test_grafana_configmaps_are_the_compose_files_byte_for_byte(
    rendered: dict[str, Objects],
) -> None:
    grafana = ROOT / "deploy/grafana"
    expected = {
        "grafana-dashboards": {
            p.name: p.read_text() for p in (grafana / "dashboards").glob("*.json")
        },
        "grafana-datasources": {
            "prometheus.yml": (grafana / "provisioning/datasources/prometheus.yml").read_text()
        },
        "grafana-dashboard-providers": {
            "dmoe.yml": (grafana / "provisioning/dashboards/dmoe.yml").read_text()
        },
    }
    for overlay in ("cpu", "gpu", "tls"):
        maps = {
            o["metadata"]["name"].rsplit("-", 1)[0]: o["data"]
            for o in rendered[overlay]
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("grafana-")
        }
        assert maps == expected, overlay
    # the same bytes compose mounts (the dashboards are generated: tests/test_deploy_files.py)
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    assert (
        "./grafana/dashboards:/var/lib/grafana/dashboards:ro"
        in compose["services"]["grafana"]["volumes"]
    )


def test_set_images_points_every_overlay_at_a_registry(tree: Path, tmp_path: Path) -> None:
    work = tmp_path / "deploy/k8s"
    shutil.copytree(tree, work)
    shutil.copytree(ROOT / "deploy/grafana", tmp_path / "deploy/grafana")
    script = [
        sys.executable,
        str(ROOT / "deploy/k8s/set_images.py"),
        "registry.example.com:5000/team",
        "--tag",
        "abc123",
        "--dir",
        str(work / "components/images"),
    ]
    subprocess.run(script, check=True, capture_output=True)
    text = (work / "components/images/kustomization.yaml").read_text()
    assert text.startswith("# Where the pods get the dmoe images.")
    images = {
        name: {
            c["image"]
            for o in render(work / "overlays" / name)
            if o["kind"] in ("StatefulSet", "Deployment")
            for c in o["spec"]["template"]["spec"]["containers"]
        }
        for name in ("cpu", "gpu")
    }
    registry = "registry.example.com:5000/team"
    assert images["cpu"] == {
        f"{registry}/dmoe-dht:abc123",
        f"{registry}/dmoe-expert:abc123",
        f"{registry}/dmoe-trainer:abc123",
        "prom/prometheus:v2.53.0",
        "grafana/grafana:11.1.0",
    }
    assert f"{registry}/dmoe-expert-cuda:abc123" in images["gpu"]
    bad = subprocess.run([*script[:2], "Bad Registry"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a registry name" in bad.stderr


def test_crd_schemas_are_generated_by_the_script() -> None:
    """scripts/gen_crd_schemas.py --check: the committed schema is what the models give."""
    done = subprocess.run(
        [sys.executable, "scripts/gen_crd_schemas.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_check_cli_reports_problems_and_exit_status(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy.k8s.tools import check

    assert check.main([str(tree / "overlays/gpu"), "--gpu"]) == 0
    assert "0 problems" in capsys.readouterr().out
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "deploy.k8s.tools.check", str(tree / "overlays/cpu"), "--gpu"]
    wrong = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode == 1 and "no nvidia.com/gpu limit" in wrong.stdout, wrong.stdout
