"""Generate the Grafana dashboards in ``deploy/grafana/dashboards/`` from one compact spec.

Usage: ``python deploy/grafana/dashboards.py`` (write) or ``--check`` (exit 1 when the
committed JSON differs). Panels are declared once here (title, PromQL, unit), so the JSON
stays consistent and the end-to-end test can evaluate every query against Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "dmoe-prometheus"}
W = "[1m]"


def q(metric_hist: str, quantile: float, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric_hist}_bucket{W})))"


def rate_or_zero(numerator: str, denominator: str, by: str) -> str:
    """A rate that is 0 (not absent) when nothing happened, so the panel always has data."""
    return f"sum by ({by}) (rate({numerator}{W})) or sum by ({by}) (rate({denominator}{W})) * 0"


# dashboard file -> (title, [(panel title, [(legend, expr)], unit)])
DASHBOARDS: dict[str, tuple[str, list[tuple[str, list[tuple[str, str]], str]]]] = {
    "swarm-overview": (
        "dmoe / swarm overview",
        [
            ("DHT peers up", [("peers", 'count(up{job="dht"} == 1)')], "none"),
            ("Expert servers up", [("servers", 'count(up{job="expert"} == 1)')], "none"),
            ("Experts hosted", [("experts", "count(dmoe_expert_optimizer_steps_total)")], "none"),
            ("Trainers up", [("trainers", 'count(up{job="trainer"} == 1)')], "none"),
            (
                "Trainer steps/s",
                [("{{instance}}", f"sum by (instance) (rate(dmoe_trainer_steps_total{W}))")],
                "ops",
            ),
            ("Training loss", [("{{instance}}", "dmoe_trainer_train_loss")], "none"),
            (
                "Test accuracy",
                [("{{instance}}", "dmoe_trainer_test_accuracy_ratio")],
                "percentunit",
            ),
            (
                "Expert samples/s",
                [("{{method}}", f"sum by (method) (rate(dmoe_expert_samples_total{W}))")],
                "ops",
            ),
        ],
    ),
    "dht": (
        "dmoe / DHT",
        [
            ("Routing table size", [("{{instance}}", "dmoe_dht_routing_table_peers")], "none"),
            ("Stored records", [("{{instance}}", "dmoe_dht_stored_records")], "none"),
            (
                "RPCs served/s by method",
                [("{{method}}", f"sum by (method) (rate(dmoe_dht_rpc_requests_total{W}))")],
                "reqps",
            ),
            (
                "Outgoing RPCs/s by method and code",
                [
                    (
                        "{{method}} {{code}}",
                        f"sum by (method, code) (rate(dmoe_dht_outgoing_rpcs_total{W}))",
                    )
                ],
                "reqps",
            ),
            (
                "RPC latency (served)",
                [
                    ("p50 {{method}}", q("dmoe_dht_rpc_duration_seconds", 0.5, "method")),
                    ("p95 {{method}}", q("dmoe_dht_rpc_duration_seconds", 0.95, "method")),
                ],
                "s",
            ),
            (
                "Lookup hops (rounds) per operation",
                [
                    ("p50 {{method}}", q("dmoe_dht_lookup_rounds", 0.5, "method")),
                    ("p95 {{method}}", q("dmoe_dht_lookup_rounds", 0.95, "method")),
                ],
                "none",
            ),
            ("Blacklisted peers", [("{{instance}}", "dmoe_dht_blacklisted_peers")], "none"),
            ("Joined", [("{{instance}}", "dmoe_dht_joined")], "bool"),
        ],
    ),
    "experts": (
        "dmoe / experts",
        [
            (
                "Requests/s by expert",
                [
                    (
                        "{{expert}} {{method}}",
                        f"sum by (expert, method) (rate(dmoe_expert_requests_total{W}))",
                    )
                ],
                "reqps",
            ),
            (
                "Errors/s by code",
                [
                    (
                        "{{code}}",
                        rate_or_zero(
                            'dmoe_expert_requests_total{code!="OK"}',
                            "dmoe_expert_requests_total",
                            "code",
                        ),
                    )
                ],
                "reqps",
            ),
            (
                "Batch size (samples)",
                [
                    ("p50 {{method}}", q("dmoe_expert_batch_size_samples", 0.5, "method")),
                    ("p95 {{method}}", q("dmoe_expert_batch_size_samples", 0.95, "method")),
                ],
                "none",
            ),
            (
                "Queue wait",
                [("p95 {{method}}", q("dmoe_expert_queue_wait_seconds", 0.95, "method"))],
                "s",
            ),
            (
                "Compute time per batch",
                [("p95 {{method}}", q("dmoe_expert_compute_seconds", 0.95, "method"))],
                "s",
            ),
            (
                "Optimizer steps/s by expert",
                [("{{expert}}", f"sum by (expert) (rate(dmoe_expert_optimizer_steps_total{W}))")],
                "ops",
            ),
            ("Checkpoint age", [("{{instance}}", "dmoe_expert_checkpoint_age_seconds")], "s"),
            (
                "DHT declarations/s",
                [("{{instance}}", f"rate(dmoe_expert_dht_declarations_total{W})")],
                "ops",
            ),
        ],
    ),
    "trainer": (
        "dmoe / trainer",
        [
            ("Training loss", [("{{instance}}", "dmoe_trainer_train_loss")], "none"),
            ("Test loss", [("{{instance}}", "dmoe_trainer_test_loss")], "none"),
            (
                "Test accuracy",
                [("{{instance}}", "dmoe_trainer_test_accuracy_ratio")],
                "percentunit",
            ),
            (
                "Expert call latency",
                [
                    (
                        "p50 {{method}}",
                        q("dmoe_trainer_expert_call_duration_seconds", 0.5, "method"),
                    ),
                    (
                        "p95 {{method}}",
                        q("dmoe_trainer_expert_call_duration_seconds", 0.95, "method"),
                    ),
                ],
                "s",
            ),
            (
                "Expert failures/s by reason",
                [
                    (
                        "{{reason}}",
                        rate_or_zero(
                            "dmoe_trainer_expert_failures_total",
                            "dmoe_trainer_steps_total",
                            "reason",
                        ),
                    )
                ],
                "ops",
            ),
            (
                "Experts answered per sample",
                [
                    ("p50", q("dmoe_trainer_experts_answered", 0.5)),
                    ("p05", q("dmoe_trainer_experts_answered", 0.05)),
                ],
                "none",
            ),
            (
                "Beam search time",
                [("p95", q("dmoe_trainer_beam_search_duration_seconds", 0.95))],
                "s",
            ),
            ("Experts in back-off", [("{{instance}}", "dmoe_trainer_experts_skipped")], "none"),
            # averaging of the trainers' own parameters (docs/averaging.md)
            (
                "Averaging: rounds/s by outcome",
                [
                    (
                        "{{outcome}}",
                        f"sum by (outcome) (rate(dmoe_trainer_averaging_rounds_total{W}))",
                    )
                ],
                "ops",
            ),
            (
                "Averaging: group size",
                [
                    ("p50", q("dmoe_trainer_averaging_group_size", 0.5)),
                    ("p05", q("dmoe_trainer_averaging_group_size", 0.05)),
                ],
                "none",
            ),
            (
                "Averaging: round time",
                [
                    ("p50", q("dmoe_trainer_averaging_round_duration_seconds", 0.5)),
                    ("p95", q("dmoe_trainer_averaging_round_duration_seconds", 0.95)),
                ],
                "s",
            ),
            (
                "Averaging: bytes/s",
                [
                    (
                        "{{direction}}",
                        f"sum by (direction) (rate(dmoe_trainer_averaging_bytes_total{W}))"
                        f" or sum by (direction) (rate(dmoe_trainer_steps_total{W})) * 0",
                    )
                ],
                "Bps",
            ),
            (
                "Averaging: refused/s by reason",
                [
                    (
                        "{{reason}}",
                        rate_or_zero(
                            "dmoe_trainer_averaging_refused_total",
                            "dmoe_trainer_steps_total",
                            "reason",
                        ),
                    )
                ],
                "ops",
            ),
            (
                "Averaging: seconds since the last averaged round",
                [
                    (
                        "{{instance}}",
                        "time() - (dmoe_trainer_averaging_last_round_timestamp_seconds > 0)"
                        " or dmoe_trainer_averaging_last_round_timestamp_seconds",
                    )
                ],
                "s",
            ),
        ],
    ),
}


def dashboard(uid: str, title: str, panels: list[tuple[str, list[tuple[str, str]], str]]) -> dict:
    built = []
    for index, (panel_title, targets, unit) in enumerate(panels):
        built.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": panel_title,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "datasource": DATASOURCE,
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for i, (legend, expr) in enumerate(targets)
                ],
            }
        )
    return {
        "uid": f"dmoe-{uid}",
        "title": title,
        "tags": ["dmoe"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "5s",
        "time": {"from": "now-15m", "to": "now"},
        "panels": built,
        "templating": {"list": []},
        "annotations": {"list": []},
    }


def render() -> dict[str, str]:
    return {
        f"{name}.json": json.dumps(dashboard(name, title, panels), indent=2) + "\n"
        for name, (title, panels) in DASHBOARDS.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    files = render()
    if args.check:
        stale = [
            n
            for n, text in files.items()
            if not (OUT / n).is_file() or (OUT / n).read_text() != text
        ]
        if stale:
            print("stale dashboards: " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
