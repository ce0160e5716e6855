"""The pods a cluster would run from rendered manifests, as the control plane and kubelet see them.

Workloads become pods (a StatefulSet's ``<name>-<ordinal>``, a Deployment's with a stand-in
suffix), each container gets the environment the kubelet would give it (ConfigMap and Secret
references, the downward API, ``$(VAR)`` expansion; the image's own ``ENV`` read from
``deploy/Dockerfile``), and DNS names are derived from the cluster's rules (Services, the
StatefulSet pods of a headless Service, the namespace search path). The static checks and the
Docker probe test both use this one model, so the containers the test starts are the pods.
"""

from __future__ import annotations

import base64
import math
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CLUSTER_DOMAIN = "cluster.local"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
DMOE_SERVICES = ("dht", "expert", "trainer", "explorer")
# image repository (last path part, tag dropped) -> deploy/Dockerfile target
IMAGE_TARGETS = {
    "dmoe-dht": "dht",
    "dmoe-expert": "expert",
    "dmoe-expert-cuda": "expert",
    "dmoe-trainer": "trainer",
}


@dataclass
class Pod:
    name: str
    namespace: str
    workload: dict[str, Any]
    labels: dict[str, str]
    annotations: dict[str, str]
    spec: dict[str, Any]
    ordinal: int | None = None  # StatefulSet pods
    ip: str = "192.0.2.10"  # stand-in for status.podIP (TEST-NET-1)

    @property
    def kind(self) -> str:
        return self.workload["kind"]

    @property
    def hostname(self) -> str:
        return self.spec.get("hostname") or self.name

    @property
    def subdomain(self) -> str | None:
        if self.kind == "StatefulSet":
            return self.workload["spec"].get("serviceName")
        return self.spec.get("subdomain")

    def containers(self) -> list[dict[str, Any]]:
        return list(self.spec.get("containers", []))

    def volume(self, name: str) -> dict[str, Any] | None:
        for volume in self.spec.get("volumes", []):
            if volume["name"] == name:
                return volume
        for claim in self.workload["spec"].get("volumeClaimTemplates", []):
            if claim["metadata"]["name"] == name:
                return {"name": name, "persistentVolumeClaim": {"claimName": name}}
        return None


def namespace_of(obj: dict[str, Any]) -> str:
    return obj.get("metadata", {}).get("namespace") or "default"


def find(objects: list[dict[str, Any]], kind: str, name: str, namespace: str) -> dict | None:
    for obj in objects:
        meta = obj.get("metadata", {})
        if obj.get("kind") == kind and meta.get("name") == name and namespace_of(obj) == namespace:
            return obj
    return None


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") in WORKLOAD_KINDS]


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]


def pods(objects: list[dict[str, Any]], max_per_workload: int | None = None) -> list[Pod]:
    """Every pod the workloads ask for (``replicas``, default 1), at most ``max_per_workload``."""
    out = []
    for workload in workloads(objects):
        template = pod_template(workload)
        meta = template.get("metadata", {})
        replicas = workload["spec"].get("replicas", 1)
        if max_per_workload is not None:
            replicas = min(replicas, max_per_workload)
        name = workload["metadata"]["name"]
        for i in range(replicas):
            stateful = workload["kind"] == "StatefulSet"
            out.append(
                Pod(
                    name=f"{name}-{i}" if stateful else f"{name}-5d8f7c9b4-{i:05d}"[-63:],
                    namespace=namespace_of(workload),
                    workload=workload,
                    labels=dict(meta.get("labels", {})),
                    annotations=dict(meta.get("annotations", {})),
                    spec=template["spec"],
                    ordinal=i if stateful else None,
                )
            )
    return out


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A Service's ``selector`` map or a ``LabelSelector`` (matchLabels, matchExpressions)."""
    if not selector:
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        match = selector.get("matchLabels") or {}
        expressions = selector.get("matchExpressions") or []
    else:
        match, expressions = selector, []
    if any(labels.get(k) != v for k, v in match.items()):
        return False
    for expr in expressions:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op, False)
        if not ok:
            return False
    return True


def services_selecting(objects: list[dict[str, Any]], pod: Pod) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o.get("kind") == "Service"
        and namespace_of(o) == pod.namespace
        and selects(o["spec"].get("selector"), pod.labels)
    ]


# ---------------------------------------------------------------- images


@cache
def _dockerfile_stages() -> dict[str, dict[str, Any]]:
    """``deploy/Dockerfile`` stages: parent, ENV, USER, ENTRYPOINT (JSON form)."""
    import json

    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else parts[0]
            current = {"parent": parts[0], "env": {}, "user": None, "entrypoint": None}
            stages[name] = current
        elif current is None:
            continue
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                current["env"][key] = value
        elif word == "USER":
            current["user"] = rest.strip()
        elif word == "ENTRYPOINT":
            current["entrypoint"] = json.loads(rest)
    return stages


def image_target(image: str) -> str | None:
    repo = image.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
    return IMAGE_TARGETS.get(repo)


def image_config(image: str) -> dict[str, Any] | None:
    """ENV, USER and ENTRYPOINT a dmoe image gets from ``deploy/Dockerfile`` (None: not ours)."""
    target = image_target(image)
    if target is None:
        return None
    stages = _dockerfile_stages()
    chain, name = [], target
    while name in stages:
        chain.append(stages[name])
        name = stages[name]["parent"]
    config: dict[str, Any] = {"env": {}, "user": None, "entrypoint": None, "target": target}
    for stage in reversed(chain):
        config["env"].update(stage["env"])
        config["user"] = stage["user"] or config["user"]
        config["entrypoint"] = stage["entrypoint"] or config["entrypoint"]
    return config


def argv(container: dict[str, Any]) -> list[str]:
    """What runs: ``command`` (else the image's ENTRYPOINT) then ``args``."""
    config = image_config(container["image"]) or {}
    command = container.get("command") or config.get("entrypoint") or []
    return [*command, *container.get("args", [])]


def dmoe_service(container: dict[str, Any]) -> str | None:
    """The dmoe service (``dht``, ``expert``, ...) a container runs with ``python -m``."""
    words = argv(container)
    for i, word in enumerate(words[:-1]):
        if word == "-m" and words[i + 1].startswith("services."):
            name = words[i + 1].split(".", 1)[1]
            return name if name in DMOE_SERVICES else None
    return None


# ---------------------------------------------------------------- environment


class Unresolvable(ValueError):
    """A reference the kubelet could not resolve: the container would not start."""


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def memory_bytes(quantity: str | int) -> int:
    text = str(quantity)
    for suffix, factor in {**_BINARY, **_DECIMAL}.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(float(text))


def _resource_field(container: dict[str, Any], ref: dict[str, Any]) -> str:
    """``resourceFieldRef`` as the kubelet computes it: ceil(value / divisor)."""
    kind, _, resource = ref["resource"].partition(".")
    value = container.get("resources", {}).get(kind, {}).get(resource)
    if value is None:
        raise Unresolvable(f"resourceFieldRef {ref['resource']}: not set (node allocatable)")
    divisor = ref.get("divisor", "1")
    if resource == "cpu":
        return str(math.ceil(cpu_cores(value) / cpu_cores(divisor)))
    return str(math.ceil(memory_bytes(value) / memory_bytes(divisor)))


def _field(pod: Pod, path: str) -> str:
    fields = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "status.podIP": pod.ip,
        "status.hostIP": "192.0.2.1",
        "spec.nodeName": "node-1",
        "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
    }
    if path in fields:
        return fields[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        source = pod.labels if match.group(1) == "labels" else pod.annotations
        if match.group(2) in source:
            return source[match.group(2)]
    raise Unresolvable(f"fieldRef {path}: not supported here")


def _data(obj: dict[str, Any]) -> dict[str, str]:
    data = dict(obj.get("data") or {})
    if obj["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in data.items()}
        data.update(obj.get("stringData") or {})
    return data


def _ref(objects: list, kind: str, name: str, namespace: str, key: str | None) -> str | None:
    obj = find(objects, kind, name, namespace)
    if obj is None:
        raise Unresolvable(f"{kind} {name} not found")
    data = _data(obj)
    if key is None:
        return None
    if key not in data:
        raise Unresolvable(f"{kind} {name} has no key {key}")
    return data[key]


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (``$$`` escapes; unknown references stay as written)."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(sub, text)


def container_env(
    objects: list[dict[str, Any]], pod: Pod, container: dict[str, Any], *, image_env: bool = True
) -> dict[str, str]:
    """The environment the process sees: image ENV, then envFrom, then env (later wins)."""
    env: dict[str, str] = {}
    if image_env:
        env.update((image_config(container["image"]) or {}).get("env", {}))
    env["HOSTNAME"] = pod.hostname
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                ref = source[key]
                obj = find(objects, kind, ref["name"], pod.namespace)
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise Unresolvable(f"envFrom {kind} {ref['name']} not found")
                env.update({prefix + k: v for k, v in _data(obj).items()})
    for var in container.get("env", []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value", "")), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[name] = _field(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = _resource_field(container, source["resourceFieldRef"])
        else:
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if key in source:
                    ref = source[key]
                    try:
                        value = _ref(objects, kind, ref["name"], pod.namespace, ref["key"])
                    except Unresolvable:
                        if ref.get("optional"):
                            break
                        raise
                    env[name] = value or ""
    return env


def container_argv(objects: list, pod: Pod, container: dict[str, Any]) -> list[str]:
    env = container_env(objects, pod, container)
    return [expand(word, env) for word in argv(container)]


# ---------------------------------------------------------------- DNS


def dns_names(objects: list[dict[str, Any]], pod_list: list[Pod]) -> dict[str, list[Pod]]:
    """Fully qualified DNS name -> the pods it resolves to (A records) in the cluster.

    A Service name resolves to the pods it selects (a ClusterIP Service to a virtual IP that
    reaches them: the same pods); ``<hostname>.<subdomain>`` to a pod when a headless Service
    of that name selects it (a StatefulSet's pods with its ``serviceName``). Readiness is
    ignored: headless Services here publish not-ready addresses, which is what it models.
    """
    records: dict[str, list[Pod]] = {}
    for svc in (o for o in objects if o.get("kind") == "Service"):
        namespace = namespace_of(svc)
        fqdn = f"{svc['metadata']['name']}.{namespace}.svc.{CLUSTER_DOMAIN}"
        selected = [
            p
            for p in pod_list
            if p.namespace == namespace and selects(svc["spec"].get("selector"), p.labels)
        ]
        records.setdefault(fqdn, []).extend(selected)
        if svc["spec"].get("clusterIP") == "None":
            for pod in selected:
                if pod.subdomain == svc["metadata"]["name"]:
                    records.setdefault(f"{pod.hostname}.{fqdn}", []).append(pod)
    return records


def search_path(namespace: str) -> list[str]:
    return [f"{namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN]


def resolve(name: str, namespace: str, records: dict[str, list[Pod]]) -> list[Pod] | None:
    """What a pod in ``namespace`` gets for ``name`` (ndots:5: the search path first)."""
    name = name.rstrip(".")
    for candidate in [f"{name}.{s}" for s in search_path(namespace)] + [name]:
        if records.get(candidate):
            return records[candidate]
    return None


def peers(text: str) -> Iterator[tuple[str, int]]:
    for peer in text.replace(",", " ").split():
        host, _, port = peer.rpartition(":")
        yield host.strip("[]"), int(port)


@dataclass
class Mount:
    path: str
    volume: dict[str, Any]
    read_only: bool
    sub_path: str | None = None
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = next(
            (
                k
                for k in (
                    "emptyDir",
                    "persistentVolumeClaim",
                    "configMap",
                    "secret",
                    "projected",
                    "downwardAPI",
                    "hostPath",
                    "ephemeral",
                    "csi",
                )
                if k in self.volume
            ),
            "other",
        )


def mount_for(pod: Pod, container: dict[str, Any], path: str) -> Mount | None:
    """The volume mount holding ``path`` (the deepest one), None for the root filesystem."""
    best: Mount | None = None
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/") or "/"
        holds = path == root or path.startswith(root + "/")
        if holds and (best is None or len(root) > len(best.path)):
            volume = pod.volume(mount["name"]) or {"name": mount["name"]}
            best = Mount(root, volume, bool(mount.get("readOnly")), mount.get("subPath"))
    return best
