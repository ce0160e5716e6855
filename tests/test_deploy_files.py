"""Deployment files that cannot run here are checked for structure: Grafana's provisioning
and dashboards (no Grafana server installs on this machine), the compose file and the
Prometheus configuration. Their queries are evaluated against a live Prometheus by
tests/test_swarm_docker.py."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"


def test_dashboards_are_generated_from_their_spec() -> None:
    check = [sys.executable, "deploy/grafana/dashboards.py", "--check"]
    result = subprocess.run(check, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/dmoe.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts

    dashboards = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert {d.stem for d in dashboards} == {"swarm-overview", "dht", "experts", "trainer"}
    uids = set()
    for path in dashboards:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids and board["title"] and board["panels"]
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == source["uid"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip() and target["datasource"]["uid"] == source["uid"]
                assert target["expr"].count("(") == target["expr"].count(")")


def test_compose_file_shape() -> None:
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    services = compose["services"]
    assert {"dht-bootstrap", "dht", "expert", "trainer", "prometheus", "grafana"} <= set(services)
    # the explorer: the DHT image running services.explorer, its page on a published port
    explorer = services["explorer"]
    assert explorer["image"] == services["dht"]["image"] and "profiles" not in explorer
    assert explorer["entrypoint"] == ["python", "-m", "services.explorer"]
    assert explorer["ports"] == ["${DMOE_EXPLORER_PORT:-8080}:8080"]
    assert explorer["environment"]["DMOE_HTTP_PORT"] == 8080
    for name in ("dht", "expert", "trainer"):
        assert "ports" not in services[name], f"{name} must not pin host ports (--scale)"
    for name, service in services.items():
        for dep, condition in (service.get("depends_on") or {}).items():
            assert dep in services and condition["condition"] == "service_healthy", name
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert "expert-checkpoints:/data/checkpoints" in services["expert"]["volumes"]


def test_prometheus_scrapes_every_service_by_dns() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"dht", "expert", "trainer", "explorer"}
    ports = {name: job["dns_sd_configs"][0]["port"] for name, job in jobs.items()}
    assert ports == {"dht": 9330, "expert": 9340, "trainer": 9350, "explorer": 9360}
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())["services"]
    assert compose["explorer"]["environment"]["DMOE_METRICS_PORT"] == 9360


def test_tls_override_mounts_each_service_its_own_pair_and_the_ca(tmp_path) -> None:
    """deploy/docker-compose.tls.yml against the files deploy/swarm.sh has the script make."""
    base = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())["services"]
    services = yaml.safe_load((ROOT / "deploy/docker-compose.tls.yml").read_text())["services"]
    # Prometheus and Grafana unchanged: /metrics stays plain HTTP
    assert set(services) == {"dht-bootstrap", "dht", "expert", "trainer", "explorer"}
    assert set(services) <= set(base)
    script = (ROOT / "deploy/swarm.sh").read_text()
    assert "tls_services=(dht-bootstrap dht expert trainer explorer)" in script
    assert "-f deploy/docker-compose.tls.yml" in script
    assert subprocess.run(["bash", "-n", "deploy/swarm.sh"], cwd=ROOT).returncode == 0
    make = [sys.executable, "deploy/tls/make_certs.py", str(tmp_path), "--names", *services]
    assert subprocess.run(make, cwd=ROOT, capture_output=True).returncode == 0

    from services.common.tls import TLSConfig

    for name, service in services.items():
        env = service["environment"]
        assert env["DMOE_TLS_SERVER_NAME"] == "dmoe"
        mounts = {}
        for volume in service["volumes"]:
            source, target, mode = volume.split(":")
            assert mode == "ro" and source.startswith("./tls/certs/"), volume
            mounts[target] = tmp_path / source.removeprefix("./tls/certs/")
        assert set(mounts) == {env["DMOE_TLS_CERT"], env["DMOE_TLS_KEY"], env["DMOE_TLS_CA"]}
        assert {p.name for p in mounts.values()} == {"ca.crt", f"{name}.crt", f"{name}.key"}
        # what the container reads makes a working mutual-TLS configuration
        tls = TLSConfig(*(str(mounts[env[f"DMOE_TLS_{v}"]]) for v in ("CERT", "KEY", "CA")))
        assert tls.mutual
