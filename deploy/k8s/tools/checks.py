"""Cross-object checks of rendered manifests: what a cluster would otherwise reveal at run time.

Each check takes the rendered objects and returns problems (strings starting with the
check's name); an empty list means it passed. ``tests/test_k8s_manifests.py`` runs them on
every overlay and, for each one, a broken manifest that it must reject. The dmoe services'
own argument parsers judge every ``DMOE_*`` variable and argument (``build_parser()``), so a
flag renamed in the code fails here, not in a CrashLoopBackOff.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from deploy.k8s.tools.pods import (
    DMOE_SERVICES,
    Pod,
    Unresolvable,
    container_argv,
    container_env,
    dmoe_service,
    dns_names,
    find,
    image_config,
    mount_for,
    namespace_of,
    peers,
    pods,
    resolve,
    selects,
    services_selecting,
    workloads,
)

Objects = list[dict[str, Any]]
GPU = "nvidia.com/gpu"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")
# the grpc.health.v1 service names each server registers ("" = the whole server)
HEALTH_NAMES = {
    "dht": {"", "dmoe.DHT", "dmoe.DHTPeer"},
    "expert": {"", "dmoe.Expert"},
    "trainer": {"", "dmoe.Trainer"},
    "explorer": {""},  # serves no dmoe service, health and reflection only
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
GRAFANA = Path(__file__).resolve().parents[2] / "grafana"


def _containers(objects: Objects) -> Iterator[tuple[Pod, dict[str, Any]]]:
    """One pod per workload (the template) and its containers."""
    for pod in pods(objects, max_per_workload=1):
        for container in pod.containers():
            yield pod, container


def _where(pod: Pod, container: dict[str, Any] | None = None) -> str:
    where = f"{pod.kind}/{pod.workload['metadata']['name']}"
    return f"{where} container {container['name']}" if container else where


# ---------------------------------------------------------------- the services' own parsers


class FlagError(ValueError):
    pass


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("DMOE_") or k in ("XDG_DATA_HOME",)]:
            del os.environ[key]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def build_parser(service: str) -> argparse.ArgumentParser:
    return importlib.import_module(f"services.{service}.__main__").build_parser()


def parse_service(service: str, argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    """What ``python -m services.<service>`` makes of ``argv`` and ``env``, as its ``main``
    checks it before starting (files are not opened). Raises :class:`FlagError`."""
    from services.common.flags import env_name

    parser = build_parser(service)

    def error(message: str) -> None:
        raise FlagError(message)

    parser.error = error  # type: ignore[method-assign]
    flags = {env_name(f) for a in parser._actions for f in a.option_strings if f.startswith("--")}
    unknown = sorted(k for k in env if k.startswith("DMOE_") and k not in flags)
    if unknown:
        raise FlagError(f"{', '.join(unknown)}: no such flag of services.{service} (ignored)")
    with _environment(env):
        args = parser.parse_args(argv)
    try:
        if service == "dht":
            from services.dht.__main__ import config_from

            config_from(args)
        elif service == "expert":
            from services.expert import uid as uids
            from services.expert.__main__ import config_from_args

            if not args.no_dht and not args.initial_peers:
                raise FlagError("no --initial-peers and no --no-dht")
            config = config_from_args(args)
            uids.grid_size(uids.split_patterns(config.experts))
        elif service == "trainer" and not args.initial_peers and not args.model_module:
            raise FlagError("no --initial-peers")
        elif service == "explorer":
            from services.explorer.__main__ import config_from

            if not args.initial_peers:
                raise FlagError("no --initial-peers")
            config_from(args)
    except ValueError as exc:
        raise FlagError(str(exc)) from None
    return args


def service_args(objects: Objects, pod: Pod, container: dict[str, Any]) -> argparse.Namespace:
    service = dmoe_service(container)
    assert service is not None
    words = container_argv(objects, pod, container)
    start = words.index(f"services.{service}") + 1
    return parse_service(service, words[start:], container_env(objects, pod, container))


def _dmoe(objects: Objects) -> Iterator[tuple[Pod, dict[str, Any], str, Any]]:
    """dmoe containers with their parsed flags (None where they do not parse)."""
    for pod, container in _containers(objects):
        service = dmoe_service(container)
        if service is None:
            continue
        try:
            args = service_args(objects, pod, container)
        except (FlagError, Unresolvable):
            args = None
        yield pod, container, service, args


def check_flags(objects: Objects) -> list[str]:
    """Every DMOE_* variable and argument of a dmoe container is accepted by its parser."""
    problems = []
    for pod, container in _containers(objects):
        if dmoe_service(container) is None:
            continue
        try:
            service_args(objects, pod, container)
        except (FlagError, Unresolvable) as exc:
            problems.append(f"flags: {_where(pod, container)}: {exc}")
    return problems


# ---------------------------------------------------------------- selectors, ports, probes


def check_selectors(objects: Objects) -> list[str]:
    """Workload selectors match their pod template; Services and PDBs select some pod."""
    problems = []
    all_pods = pods(objects, max_per_workload=1)
    for workload in workloads(objects):
        selector = workload["spec"].get("selector")
        labels = workload["spec"]["template"].get("metadata", {}).get("labels", {})
        if selector is not None and not selects(selector, labels):
            problems.append(
                f"selectors: {workload['kind']}/{workload['metadata']['name']}: "
                f"selector {selector} does not match its pod labels {labels}"
            )
    for obj in objects:
        if obj.get("kind") not in ("Service", "PodDisruptionBudget"):
            continue
        selector = obj["spec"].get("selector")
        if selector is None:
            continue
        if not any(
            p.namespace == namespace_of(obj) and selects(selector, p.labels) for p in all_pods
        ):
            problems.append(
                f"selectors: {obj['kind']}/{obj['metadata']['name']}: "
                f"selector {selector} selects no pod"
            )
    return problems


def _port(container: dict[str, Any], port: int | str) -> dict[str, Any] | None:
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return declared
    return None


def check_service_ports(objects: Objects) -> list[str]:
    """Each Service targetPort names (or numbers) a port of every pod it selects."""
    problems = []
    for pod in pods(objects, max_per_workload=1):
        for svc in services_selecting(objects, pod):
            for port in svc["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                if not any(_port(c, target) for c in pod.containers()):
                    problems.append(
                        f"service-ports: Service/{svc['metadata']['name']} port "
                        f"{port.get('name', port['port'])}: targetPort {target!r} "
                        f"is no container port of {_where(pod)}"
                    )
    return problems


def check_probes(objects: Objects) -> list[str]:
    """One handler per probe; probe ports are container ports (gRPC probes take numbers);
    a gRPC probe asks for a health service name the server registers."""
    problems = []
    for pod, container in _containers(objects):
        service = dmoe_service(container)
        for kind in PROBES:
            probe = container.get(kind)
            if probe is None:
                continue
            where = f"probes: {_where(pod, container)} {kind}"
            handlers = [h for h in HANDLERS if h in probe]
            if len(handlers) != 1:
                problems.append(f"{where}: {len(handlers)} handlers {handlers}; exactly one")
                continue
            (handler,) = handlers
            if handler == "exec":
                continue
            port = probe[handler].get("port")
            if handler == "grpc" and not isinstance(port, int):
                problems.append(f"{where}: gRPC probes take a port number, not {port!r}")
            elif _port(container, port) is None:
                problems.append(f"{where}: port {port!r} is no container port")
            if handler == "grpc" and service is not None:
                name = probe["grpc"].get("service", "")
                if name not in HEALTH_NAMES[service]:
                    problems.append(
                        f"{where}: health service {name!r} is not one of "
                        f"{sorted(HEALTH_NAMES[service])}"
                    )
    return problems


def check_ports_match_flags(objects: Objects) -> list[str]:
    """The container ports named grpc/metrics are the ports the process binds (its parsed
    --port/--metrics-port); a gRPC probe and the Prometheus annotation use them."""
    problems = []
    for pod, container, _service, args in _dmoe(objects):
        if args is None:
            continue
        where = f"ports: {_where(pod, container)}"
        for name, bound in (("grpc", args.port), ("metrics", args.metrics_port)):
            declared = _port(container, name)
            if declared is None or declared["containerPort"] != bound:
                got = declared and declared["containerPort"]
                problems.append(f"{where}: port {name} is {got}, the process binds {bound}")
        for kind in PROBES:
            grpc = (container.get(kind) or {}).get("grpc")
            if grpc and grpc.get("port") != args.port:
                problems.append(f"{where}: {kind} probes {grpc.get('port')}, gRPC is {args.port}")
        annotated = pod.annotations.get("prometheus.io/port")
        if pod.annotations.get("prometheus.io/scrape") != "true":
            problems.append(f'{where}: no prometheus.io/scrape: "true" annotation')
        elif annotated != str(args.metrics_port):
            problems.append(
                f"{where}: prometheus.io/port {annotated}, metrics on {args.metrics_port}"
            )
    return problems


# ---------------------------------------------------------------- names and references


def check_statefulset_services(objects: Objects) -> list[str]:
    """A StatefulSet's serviceName is a headless Service that selects its pods (the pods'
    DNS names exist only then)."""
    problems = []
    for pod in pods(objects, max_per_workload=1):
        if pod.kind != "StatefulSet":
            continue
        name = pod.workload["spec"].get("serviceName")
        svc = find(objects, "Service", name, pod.namespace) if name else None
        if svc is None:
            problems.append(
                f"statefulset-service: {_where(pod)}: serviceName {name!r} is no Service"
            )
        elif svc["spec"].get("clusterIP") != "None":
            problems.append(f"statefulset-service: Service/{name} is not headless")
        elif not selects(svc["spec"].get("selector"), pod.labels):
            problems.append(f"statefulset-service: Service/{name} does not select {_where(pod)}")
    return problems


def check_peer_names(objects: Objects) -> list[str]:
    """Every --initial-peers host resolves in the cluster (a Service, or a StatefulSet pod of
    a headless Service, by the namespace's search path) to pods with that port."""
    problems = []
    all_pods = pods(objects)
    records = dns_names(objects, all_pods)
    for pod, container, _service, args in _dmoe(objects):
        for host, port in peers(",".join(getattr(args, "initial_peers", None) or [])):
            if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", host):
                continue
            found = resolve(host, pod.namespace, records)
            where = f"peer-names: {_where(pod, container)}: {host}:{port}"
            if not found:
                problems.append(f"{where}: no such name in namespace {pod.namespace}")
                continue
            svc = find(objects, "Service", host.split(".")[-1], pod.namespace)
            service_ports = {
                p["port"]: p.get("targetPort", p["port"])
                for p in (svc["spec"].get("ports", []) if svc else [])
            }
            for target in found:
                # through a ClusterIP Service the port is the Service's, else the pod's
                via = (
                    service_ports.get(port)
                    if svc and svc["spec"].get("clusterIP") != "None"
                    else port
                )
                if via is None or not any(_port(c, via) for c in target.containers()):
                    problems.append(f"{where}: {target.name} has no such port")
    return problems


def check_references(objects: Objects) -> list[str]:
    """Every ConfigMap, Secret, key and ServiceAccount a pod names exists (a missing one
    keeps the pod from starting); env entries have a value or a valueFrom, not both."""
    problems = []
    for pod in pods(objects, max_per_workload=1):
        for container in pod.containers():
            where = f"references: {_where(pod, container)}"
            for var in container.get("env", []):
                if "value" in var and "valueFrom" in var:
                    problems.append(f"{where}: env {var['name']} has both value and valueFrom")
            try:
                container_env(objects, pod, container, image_env=False)
            except Unresolvable as exc:
                problems.append(f"{where}: {exc}")
        for volume in pod.spec.get("volumes", []):
            for kind, key, name_key in (
                ("ConfigMap", "configMap", "name"),
                ("Secret", "secret", "secretName"),
            ):
                if key not in volume or volume[key].get("optional"):
                    continue
                obj = find(objects, kind, volume[key][name_key], pod.namespace)
                if obj is None:
                    problems.append(
                        f"references: {_where(pod)} volume {volume['name']}: "
                        f"{kind} {volume[key][name_key]} not found"
                    )
                    continue
                keys = set(obj.get("data") or {}) | set(obj.get("stringData") or {})
                for item in volume[key].get("items", []):
                    if item["key"] not in keys:
                        problems.append(
                            f"references: {kind} {obj['metadata']['name']} has no key {item['key']}"
                        )
        account = pod.spec.get("serviceAccountName")
        if account and not find(objects, "ServiceAccount", account, pod.namespace):
            problems.append(f"references: {_where(pod)}: ServiceAccount {account} not found")
    return problems


def check_service_links(objects: Objects) -> list[str]:
    """With service links on, a Service named dmoe or dmoe-* would inject DMOE_*_PORT and
    DMOE_*_SERVICE_HOST variables that the services parse as flags."""
    problems = []
    for pod, container in _containers(objects):
        if dmoe_service(container) is None or pod.spec.get("enableServiceLinks") is False:
            continue
        for svc in (o for o in objects if o.get("kind") == "Service"):
            if namespace_of(svc) == pod.namespace:
                env = svc["metadata"]["name"].upper().replace("-", "_")
                if env == "DMOE" or env.startswith("DMOE_"):
                    problems.append(
                        f"service-links: {_where(pod)}: Service/"
                        f"{svc['metadata']['name']} would set {env}_PORT"
                    )
    return problems


# ---------------------------------------------------------------- volumes and security


def _identity_path(service: str, args: Any, pod: Pod, env: dict[str, str]) -> str | None:
    """Where the service keeps its identity key (services.common.identity's rules)."""
    if service == "explorer":
        return None  # a reader: it owns nothing in the DHT and loads no identity
    if args.identity_file:
        return args.identity_file
    if service == "expert" and args.checkpoint_dir:
        from services.expert.assignment import identity_path

        return str(identity_path(Path(args.checkpoint_dir), pod.hostname))
    if not args.port:
        return None
    base = env.get("XDG_DATA_HOME") or "/home/dmoe/.local/share"
    return f"{base}/dmoe/{service}-{args.port}.key"


def check_writable_paths(objects: Objects) -> list[str]:
    """What a service writes (identity key, checkpoints) is on a writable volume, as the root
    filesystem is read-only; an expert's are on its PersistentVolumeClaim, so a rescheduled
    pod keeps its uids, weights and DHT ownership. Files it reads (TLS, trusted keys) are
    keys of a mounted Secret or ConfigMap."""
    problems = []
    for pod, container, service, args in _dmoe(objects):
        if args is None:
            continue
        env = container_env(objects, pod, container)
        where = f"paths: {_where(pod, container)}"
        written = {
            "identity": _identity_path(service, args, pod, env),
            "checkpoints": getattr(args, "checkpoint_dir", None),
            "history": getattr(args, "history_file", None),
        }
        for what, path in written.items():
            if not path:
                continue
            mount = mount_for(pod, container, path)
            if (
                mount is None
                or mount.read_only
                or mount.kind not in ("emptyDir", "persistentVolumeClaim")
            ):
                problems.append(f"{where}: {what} {path} is not on a writable volume")
            elif service == "expert" and mount.kind != "persistentVolumeClaim":
                problems.append(f"{where}: {what} {path} is not on the pod's PersistentVolumeClaim")
        read = [args.tls_cert, args.tls_key, args.tls_ca, getattr(args, "trusted_keys", None)]
        for path in filter(None, read):
            mount = mount_for(pod, container, path)
            if mount is None or mount.kind not in ("secret", "configMap"):
                problems.append(f"{where}: {path} is not in a mounted Secret or ConfigMap")
                continue
            source = mount.volume[mount.kind]
            name = source.get("secretName") or source.get("name")
            obj = find(
                objects, "Secret" if mount.kind == "secret" else "ConfigMap", name, pod.namespace
            )
            key = path[len(mount.path) + 1 :]
            items = {i["path"]: i["key"] for i in source.get("items", [])}
            if obj is not None and items.get(key, key) not in (obj.get("data") or {}):
                problems.append(f"{where}: {path}: {name} has no key {items.get(key, key)}")
    return problems


def check_security(objects: Objects) -> list[str]:
    """Pod Security "restricted" plus a read-only root filesystem, for every pod."""
    problems = []
    for pod, container in _containers(objects):
        pod_ctx = pod.spec.get("securityContext", {})
        ctx = {**pod_ctx, **container.get("securityContext", {})}
        where = f"security: {_where(pod, container)}"
        if ctx.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        user = (image_config(container["image"]) or {}).get("user")
        if ctx.get("runAsUser") in (None, 0) and not (user and user.isdigit()):
            problems.append(
                f"{where}: no numeric runAsUser (the kubelet cannot check that "
                f"image user {user or '?'} is not root)"
            )
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if ctx.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
    for pod in pods(objects, max_per_workload=1):
        for volume in pod.spec.get("volumes", []):
            if not RESTRICTED_VOLUMES & set(volume):
                problems.append(f"security: {_where(pod)} volume {volume['name']}: not allowed")
    return problems


def check_resources(objects: Objects) -> list[str]:
    """Requests and limits of CPU and memory on every container."""
    problems = []
    for pod, container in _containers(objects):
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for what in ("cpu", "memory"):
                if what not in resources.get(kind, {}):
                    problems.append(f"resources: {_where(pod, container)}: no {kind}.{what}")
    return problems


def check_termination(objects: Objects) -> list[str]:
    """The kubelet waits terminationGracePeriodSeconds after SIGTERM: enough for the
    service's --shutdown-grace and its last checkpoint (10 s more; 30 s for experts)."""
    problems = []
    for pod, _container, service, args in _dmoe(objects):
        if args is None:
            continue
        period = pod.spec.get("terminationGracePeriodSeconds", 30)
        need = args.shutdown_grace + (30 if service == "expert" else 10)
        if period < need:
            problems.append(f"termination: {_where(pod)}: {period} s to stop, needs >= {need:g}")
    return problems


# ---------------------------------------------------------------- swarm and GPUs


def check_swarm_shape(objects: Objects) -> list[str]:
    """Trainers look for experts where servers host them: the servers' --experts patterns
    together are the trainer's grids (every layer's, services.trainer.models), with the same
    hidden size; a server's --num-experts fits in its patterns."""
    from services.expert import uid as uids
    from services.trainer.models import MoEOptions

    def expand(patterns: str) -> set[str]:
        return set(uids.expand(uids.split_patterns([patterns])))

    servers = [(a, p) for p, _c, s, a in _dmoe(objects) if s == "expert" and a is not None]
    trainers = [(a, p) for p, _c, s, a in _dmoe(objects) if s == "trainer" and a is not None]
    hosted = set().union(*(expand(a.experts) for a, _p in servers)) if servers else set()
    problems = []
    for server, spod in servers:
        if server.num_experts > len(expand(server.experts)):
            problems.append(
                f"swarm: {_where(spod)}: {server.num_experts} experts per server, "
                f"the grid has {len(expand(server.experts))}"
            )
    for trainer, pod in trainers:
        options = MoEOptions(grid_size=tuple(trainer.grid), uid_prefix=trainer.uid_prefix)
        grids = [
            options.layer_prefix(i) + ".".join(f"[0:{n}]" for n in options.grid_size)
            for i in range(trainer.num_layers)
        ]
        wanted = set().union(*(expand(g) for g in grids))
        if servers and hosted != wanted:
            served = sorted({a.experts for a, _p in servers})
            problems.append(
                f"swarm: {_where(pod)} looks for {', '.join(grids)}; expert "
                f"servers host {', '.join(served)}"
            )
        for server, spod in servers:
            if server.hidden_dim != trainer.hidden_dim:
                problems.append(
                    f"swarm: hidden size {server.hidden_dim} ({_where(spod)}) != "
                    f"{trainer.hidden_dim} ({_where(pod)})"
                )
    return problems


def _tolerates_gpu_taint(spec: dict[str, Any]) -> bool:
    for toleration in spec.get("tolerations", []):
        key_ok = toleration.get("key") in (GPU, None) and (
            toleration.get("operator") == "Exists" or toleration.get("key") == GPU
        )
        if key_ok and toleration.get("effect") in (None, "", "NoSchedule"):
            return True
    return False


def check_gpu(objects: Objects, expect_gpu: bool) -> list[str]:
    """GPU overlay: expert pods limit nvidia.com/gpu (extended resources are set in limits;
    requests, if any, equal), tolerate the nvidia.com/gpu taint, run the CUDA image with
    --device cuda or auto; nothing else asks for a GPU. CPU overlay: nothing does."""
    problems = []
    for pod, container in _containers(objects):
        resources = container.get("resources", {})
        limit = resources.get("limits", {}).get(GPU)
        request = resources.get("requests", {}).get(GPU)
        where = f"gpu: {_where(pod, container)}"
        service = dmoe_service(container)
        if request is not None and request != limit:
            problems.append(f"{where}: requests {GPU} {request} but limits {limit}")
        if not (expect_gpu and service == "expert"):
            if limit or request:
                problems.append(f"{where}: asks for a GPU")
            continue
        if not limit or int(limit) < 1:
            problems.append(f"{where}: no {GPU} limit")
        if not _tolerates_gpu_taint(pod.spec):
            problems.append(f"{where}: does not tolerate the {GPU} taint")
        if "cuda" not in container["image"].rsplit("/", 1)[-1]:
            problems.append(f"{where}: image {container['image']} is not the CUDA build")
        try:
            args = service_args(objects, pod, container)
        except (FlagError, Unresolvable):
            continue
        if not (args.device == "auto" or args.device.startswith("cuda")):
            problems.append(f"{where}: --device {args.device}")
    if expect_gpu and not any(dmoe_service(c) == "expert" for _p, c in _containers(objects)):
        problems.append("gpu: no expert pods")
    return problems


# ---------------------------------------------------------------- monitoring


def check_service_monitors(objects: Objects) -> list[str]:
    """A ServiceMonitor selects Services that have its endpoint ports; every dmoe pod is
    scraped through exactly one of them."""
    problems = []
    monitors = [o for o in objects if o.get("kind") == "ServiceMonitor"]
    for monitor in monitors:
        name = monitor["metadata"]["name"]
        spec = monitor["spec"]
        namespaces = spec.get("namespaceSelector", {}).get("matchNames") or [namespace_of(monitor)]
        selected = [
            o
            for o in objects
            if o.get("kind") == "Service"
            and namespace_of(o) in namespaces
            and selects(spec.get("selector"), o["metadata"].get("labels", {}))
        ]
        if not selected:
            problems.append(f"service-monitor: {name}: selects no Service")
        for endpoint in spec.get("endpoints", []):
            port = endpoint.get("port")
            with_port = [
                s
                for s in selected
                if any(p.get("name") == port for p in s["spec"].get("ports", []))
            ]
            if not with_port:
                problems.append(f"service-monitor: {name}: no selected Service has port {port!r}")
            for pod, container in _containers(objects):
                if dmoe_service(container) is None or pod.namespace not in namespaces:
                    continue
                through = [
                    s["metadata"]["name"]
                    for s in with_port
                    if selects(s["spec"].get("selector"), pod.labels)
                ]
                if len(through) != 1:
                    problems.append(
                        f"service-monitor: {name}: {_where(pod)} is scraped "
                        f"through {len(through)} Services {through}"
                    )
    return problems


def _dashboard_jobs() -> set[str]:
    jobs = set()
    for path in (GRAFANA / "dashboards").glob("*.json"):
        jobs |= set(re.findall(r'job=\\"(\w+)\\"', path.read_text()))
    return jobs


def check_monitoring(objects: Objects) -> list[str]:
    """When Prometheus is deployed: it may list pods (Role + RoleBinding of its account),
    scrapes every job the dashboards query, and Grafana mounts the dashboards where the
    provider reads them and reaches Prometheus at its datasource URL."""
    prometheus = [w for w in workloads(objects) if w["metadata"]["name"] == "prometheus"]
    grafana = [w for w in workloads(objects) if w["metadata"]["name"] == "grafana"]
    if not prometheus:
        return []
    problems = []
    spec = prometheus[0]["spec"]["template"]["spec"]
    namespace = namespace_of(prometheus[0])
    account = spec.get("serviceAccountName", "default")
    allowed = False
    for binding in (
        o for o in objects if o.get("kind") == "RoleBinding" and namespace_of(o) == namespace
    ):
        if not any(
            s.get("kind") == "ServiceAccount" and s.get("name") == account
            for s in binding.get("subjects", [])
        ):
            continue
        role = find(objects, binding["roleRef"]["kind"], binding["roleRef"]["name"], namespace)
        for rule in (role or {}).get("rules", []):
            if "pods" in rule.get("resources", []) and {"list", "watch"} <= set(
                rule.get("verbs", [])
            ):
                allowed = True
    if not allowed or spec.get("automountServiceAccountToken") is False:
        problems.append(f"monitoring: Prometheus's ServiceAccount {account} may not list pods")
    scraped = {
        p.labels.get("app.kubernetes.io/name")
        for p in pods(objects, max_per_workload=1)
        if p.annotations.get("prometheus.io/scrape") == "true"
    }
    for job in sorted(_dashboard_jobs() - scraped):
        problems.append(f"monitoring: dashboards query job {job!r}: no scraped pod is named so")
    if grafana:
        gpod = pods(grafana)[0]
        (container,) = gpod.containers()
        provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/dmoe.yml").read_text())
        path = provider["providers"][0]["options"]["path"]
        mount = mount_for(gpod, container, path + "/x.json")
        name = mount.volume.get("configMap", {}).get("name", "") if mount else ""
        if not name.startswith("grafana-dashboards"):
            problems.append(f"monitoring: Grafana has no dashboards ConfigMap at {path}")
        source = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
        url = source["datasources"][0]["url"]
        host, port = re.fullmatch(r"https?://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
        svc = find(objects, "Service", host, namespace)
        if svc is None or int(port) not in [p["port"] for p in svc["spec"]["ports"]]:
            problems.append(f"monitoring: Grafana's datasource {url} is no Service port")
    return problems


CHECKS: dict[str, Callable[[Objects], list[str]]] = {
    "flags": check_flags,
    "selectors": check_selectors,
    "service-ports": check_service_ports,
    "probes": check_probes,
    "ports": check_ports_match_flags,
    "statefulset-service": check_statefulset_services,
    "peer-names": check_peer_names,
    "references": check_references,
    "service-links": check_service_links,
    "paths": check_writable_paths,
    "security": check_security,
    "resources": check_resources,
    "termination": check_termination,
    "swarm": check_swarm_shape,
    "service-monitor": check_service_monitors,
    "monitoring": check_monitoring,
}


def problems(objects: Objects, *, gpu: bool | None = None) -> list[str]:
    """Every check's problems. ``gpu``: True for a GPU deployment, False for CPU-only, None
    to infer it from whether any container limits nvidia.com/gpu."""
    if gpu is None:
        gpu = any(GPU in c.get("resources", {}).get("limits", {}) for _p, c in _containers(objects))
    found = [p for check in CHECKS.values() for p in check(objects)]
    return found + check_gpu(objects, gpu)


def names() -> list[str]:
    return [*CHECKS, "gpu"]


__all__ = ["CHECKS", "DMOE_SERVICES", "FlagError", "parse_service", "problems"]
