"""Benchmarks that are cheap enough to run in CI keep their output contract."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("guard", ["none", "on"])
def test_rpc_floor_reports_cpu_per_call(guard: str) -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/rpc_floor.py", "--calls", "300", "--concurrency", "4",
         "--request-bytes", "1000", "--reply-bytes", "10", "--guard", guard, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["api"] == "aio" and report["calls"] == 300 and report["concurrency"] == 4
    assert report["guard"] == guard
    assert report["request_bytes"] == 1000 and report["reply_bytes"] == 10
    for key in ("wall_us_per_call", "client_cpu_us_per_call", "server_cpu_us_per_call"):
        assert report[key] > 0, key
    assert report["cpu_us_per_call"] == round(
        report["client_cpu_us_per_call"] + report["server_cpu_us_per_call"], 1
    )


def test_convergence_smoke_reports_curves_staleness_and_a_plot(tmp_path: Path) -> None:
    """Two trainers on the digits set, one small DMoE setting and its dense counterpart."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/convergence.py"), "--dataset", "digits",
         "--updates", "16",
         "--trainers", "2", "--seeds", "0", "--settings", "dmoe:0:0,dense:0:0", "--layers", "1",
         "--grid", "4", "--k-best", "2", "--hidden-dim", "16", "--eval-every", "4",
         "--log-every", "2", "--poll-every", "0.5", "--out", str(tmp_path), "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "convergence.json").read_text())
    assert [s["model"] for s in report["settings"]] == ["dmoe", "dense"]
    assert report["config"]["x_axis"].startswith("total updates")
    for setting in report["settings"]:
        (run,) = setting["runs"]
        assert len(set(run["trainer_seeds"])) == 2  # every trainer its own seed
        assert run["evaluator_steps"] == 8 and run["total_updates"] >= 8
        final = setting["final_accuracy"]
        assert 0.0 <= final["min"] <= final["mean"] <= final["max"] <= 1.0
        curve = setting["curve"]
        assert len(curve["updates"]) == len(curve["mean"]) == len(curve["min"]) > 1
        assert all(math.isfinite(a) for a in curve["mean"])
        assert setting["staleness"]["step_time_s"]["mean"] > 0
    assert any(k.startswith("early_dmoe_accuracy") for k in report["targets"])
    png = Path(report["png"])
    assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 150_000
    png.unlink()
    replot = [
        sys.executable,
        str(ROOT / "benchmarks/convergence.py"),
        "--replot",
        str(tmp_path / "convergence.json"),
    ]
    assert subprocess.run(replot, timeout=120).returncode == 0 and png.stat().st_size > 1000
    produced = sorted(p.name for p in tmp_path.iterdir())
    assert produced == ["convergence.json", "convergence.png", "logs"]
