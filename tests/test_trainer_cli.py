"""The trainer's command line: help, environment fallbacks, clear refusals."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.trainer.flags import build_parser, grid


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.trainer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_flags_with_env_vars() -> None:
    result = run("--help")
    assert result.returncode == 0
    for flag in ("--initial-peers", "--steps", "--eval-every", "--checkpoint-dir", "--k-best"):
        assert flag in result.stdout
    assert "DMOE_INITIAL_PEERS" in result.stdout and "DMOE_K_BEST" in result.stdout


def test_flags_fall_back_to_environment(monkeypatch) -> None:
    monkeypatch.setenv("DMOE_K_BEST", "7")
    monkeypatch.setenv("DMOE_GRID", "2x3x4")
    monkeypatch.setenv("DMOE_INITIAL_PEERS", "a:1,b:2")
    args = build_parser().parse_args(["--k-best", "5", "--lr-decay", "yes"])
    assert args.k_best == 5 and args.grid == (2, 3, 4) and args.initial_peers == ["a:1", "b:2"]
    assert args.lr_decay is True


def test_bad_invocations_are_refused_clearly() -> None:
    missing = run("--steps", "1")
    assert missing.returncode == 2 and "--initial-peers" in missing.stderr
    bad_grid = run("--initial-peers", "127.0.0.1:1", "--grid", "4x0")
    assert bad_grid.returncode == 2 and "positive sizes" in bad_grid.stderr
    bad_peer = run("--initial-peers", "nohost")
    assert bad_peer.returncode == 2 and "host:port" in bad_peer.stderr
    with pytest.raises(Exception, match="not like 4x4"):
        grid("four")


def seed_line(*args: str) -> dict:
    """The trainer's structured ``seed`` log line (logged before it builds anything; the
    trainer is stopped once it is read)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.trainer", "--initial-peers", "127.0.0.1:1",
         "--port", "0", "--metrics-port", "-1", "--log-format", "json", *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for text in proc.stderr:
            line = json.loads(text) if text.startswith("{") else {}
            if line.get("msg") == "seed":
                return line
        raise AssertionError(f"no seed line; exit code {proc.wait()}")
    finally:
        proc.kill()
        proc.wait()


def test_trainers_without_seed_draw_their_own_and_log_it() -> None:
    with ThreadPoolExecutor(3) as pool:
        first, second, fixed = pool.map(lambda a: seed_line(*a), [(), (), ("--seed", "7")])
    assert first["source"] == second["source"] == "drawn" and first["seed"] != second["seed"]
    assert first["split_seed"] == second["split_seed"] == 0  # same test set for both
    assert fixed == {**fixed, "seed": 7, "source": "flag"}


def test_a_resumed_trainer_keeps_the_seed_of_its_checkpoint(tmp_path: Path) -> None:
    from services.trainer import checkpoint

    checkpoint.save(tmp_path, {"seed": 4242})
    resumed = seed_line("--checkpoint-dir", str(tmp_path))
    assert resumed == {**resumed, "seed": 4242, "source": "checkpoint"}
    assert seed_line("--checkpoint-dir", str(tmp_path), "--seed", "3")["seed"] == 3
    fresh = seed_line("--checkpoint-dir", str(tmp_path / "none"))
    assert fresh["source"] == "drawn"
