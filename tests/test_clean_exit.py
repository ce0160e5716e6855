"""A user's script ends quietly: README's examples, run as scripts against a real DHT node,
print what they read and nothing on stderr (no "Event loop is closed" tracebacks from gRPC's
poller at exit, no warnings about channels left open)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import ENV, ROOT, Proc

README = (ROOT / "README.md").read_text()


def readme_block(after: str) -> str:
    """The first ```python block of README.md after the line containing ``after``."""
    tail = README[README.index(after) :]
    match = re.search(r"```python\n(.*?)```", tail, re.S)
    assert match, f"no python block after {after!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def dht(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    logdir = tmp_path_factory.mktemp("clean-exit")
    proc = Proc("dht", ["services.dht", "--metrics-port", "-1"], logdir)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip


def test_readme_dht_example_prints_its_value_and_nothing_on_stderr(dht: Proc) -> None:
    code = readme_block("Then from Python (`services.dht.client`)")
    assert "async with DHTClient" in code  # the example closes what it opens
    result = run_script(code.replace("127.0.0.1:31332", dht.address))
    assert result.returncode == 0, result.stderr
    assert "10.0.0.5:31340" in result.stdout
    assert result.stderr == ""


def test_readme_layer_example_closes_its_swarm_quietly(dht: Proc) -> None:
    code = readme_block("The layer in your own model")
    assert "with Swarm(" in code
    # the block's "train" step: one DHT lookup through the swarm, as a forward pass makes
    code = code.replace(
        "    ...  # train", '    print("children", swarm.run(swarm.children(["ffn."])))'
    ).replace("127.0.0.1:31330", dht.address)
    result = run_script(code)
    assert result.returncode == 0, result.stderr
    assert "children {'ffn.': {}}" in result.stdout
    assert result.stderr == ""


def test_a_dht_client_closed_on_each_loop_is_reused_quietly(dht: Proc) -> None:
    # one client, several asyncio.run calls, closed at the end of each (and so reusable): its
    # link streams end before each loop does, so no gRPC event is left to reach a closed loop
    # (the next loop would log "Event loop is closed" for it)
    code = f"""
import asyncio, time
from services.dht.client import DHTClient
client = DHTClient("{dht.address}")
async def once(i):
    async with client:
        return await client.put([("reused", None, b"%d" % i, time.time() + 60)])
print(sum(asyncio.run(once(i)) == [True] for i in range(10)))
"""
    result = run_script(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "10\n"
    assert result.stderr == ""
