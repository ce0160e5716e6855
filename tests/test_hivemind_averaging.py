"""The hivemind averaging benchmark's own helpers (the hivemind run itself needs hivemind's venv
and a minute of both cores: it is run by hand, see docs/links.md)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from hivemind_averaging import group_bits, input_key, summarize, tensor_specs  # noqa: E402
from hivemind_venv import remove_stale_sockets, run_inner  # noqa: E402


def test_tensors_are_those_of_hiveminds_script() -> None:
    specs = tensor_specs(256, 3)
    assert len(specs) == 39
    assert sum(math.prod(shape) for shape, _ in specs) == 2_373_888
    first = [shape for shape, _ in specs[:13]]
    assert first == [
        (256, 768), (768,), (768,), (256, 256), (256,), (256,), (256, 1024), (1024,), (1024,),
        (2, 256, 256, 2), (256,), (256,), (256,),
    ]  # fmt: skip
    assert [fill for _, fill in specs[:13]].count("randn") == 10
    assert specs[13:26] == specs[:13]


def test_group_bits_spread_peers_evenly() -> None:
    bits = [group_bits(i, 16, 4) for i in range(16)]
    assert {b: bits.count(b) for b in bits} == {"00": 4, "01": 4, "10": 4, "11": 4}
    assert group_bits(3, 4, 4) == ""  # one group: no bits
    assert {group_bits(i, 6, 4) for i in range(6)} == {"0", "1"}  # 1.5 groups rounds to 2


def test_peers_of_one_round_average_different_inputs() -> None:
    for round_ in range(5):
        assert sorted(input_key(i, round_, 16) for i in range(16)) == list(range(16))
    assert input_key(0, 0, 16) != input_key(0, 1, 16)


def test_summary_counts_unreached_rounds_as_failed() -> None:
    records = [
        {"ok": True, "group_size": 4, "error": 1e-3},
        {"ok": True, "group_size": 2, "error": 3e-3},
        {"ok": False, "group_size": 0},
    ]  # a peer of 2 x 2 rounds never reached its last round
    summary = summarize(records, peers=2, rounds=2)
    assert summary["rounds_ok"] == 2 and summary["rounds_total"] == 4
    assert summary["success_rate"] == 0.5
    assert summary["mean_group_size"] == 3.0
    assert summary["group_sizes"] == {"2": 1, "4": 1}
    assert summary["max_abs_error"] == 3e-3 and summary["rounds_off"] == 0
    records.append({"ok": True, "group_size": 4, "error": 4.0})  # a part left unaveraged
    assert summarize(records, peers=2, rounds=2)["rounds_off"] == 1
    nothing = summarize([{"ok": False, "group_size": 0}], peers=1, rounds=1)
    assert nothing["success_rate"] == 0.0 and nothing["max_abs_error"] is None


def test_help_needs_no_hivemind() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/hivemind_averaging.py", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--target-group-size" in done.stdout and "--hid-size" in done.stdout


def test_run_inner_kills_what_the_driver_leaves_and_reads_its_last_line(tmp_path: Path) -> None:
    """hivemind's p2pd daemons can outlive a driver that ``os._exit``s: the group goes."""
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import json, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('noise'); print(json.dumps({'wall_s': 1.5}))\n"
    )
    assert run_inner([sys.executable, "-c", code], tmp_path / "run.log", timeout=60) == {
        "wall_s": 1.5
    }
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")

    def dead() -> bool:  # gone, or a zombie waiting for init to reap it
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:
            return True

    deadline = time.monotonic() + 60  # SIGKILL lands asynchronously: bound a hang only
    while not dead():
        assert time.monotonic() < deadline, "the driver's leftover child still runs"
        time.sleep(0.05)
    with pytest.raises(RuntimeError, match="failed"):
        run_inner([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "t.log", 1)


def test_stale_socket_files_go_and_live_ones_stay(tmp_path: Path) -> None:
    live, stale = tmp_path / "hivemind-live.sock", tmp_path / "hivemind-stale.sock"
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(live))
    closed = socket.socket(socket.AF_UNIX)
    closed.bind(str(stale))
    closed.close()  # the file stays behind, as a replicated p2p client's does
    try:
        remove_stale_sockets({live, stale})
        assert live.exists() and not stale.exists()
    finally:
        listening.close()
        os.unlink(live)
