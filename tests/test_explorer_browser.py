"""The swarm explorer end to end, in a real browser: a DHT node, two expert servers and a
trainer as real processes, the explorer as a real process, and Debian's Chromium driven by
selenium (headless; ``scripts/ensure-chromium.sh`` installs it when missing and root).

Screenshots of the page at a laptop's and a phone's size land in the test's output folder
(printed at the end; the README's come from scripts/explorer_screenshot.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, Proc, free_port

from services.common.announcements import (
    GRIDS_KEY,
    TRAINERS_KEY,
    GridAnnouncement,
    TrainerAnnouncement,
)
from services.common.identity import Identity
from services.dht.client import DHTClient

# an install of Chromium (first run on a fresh machine) and torch imports on a loaded machine
pytestmark = [pytest.mark.browser, pytest.mark.timeout(1200)]

PERIOD = 2.0  # the explorer's and the expert servers' update period
H = 16
MARKUP_VERSION = "<script>window.__pwned = 1</script><b>bold</b>"
MARKUP_CLASS = '<img src="x" onerror="window.__pwned = 2">'
MARKUP_RUN = "<script>window.__pwned=3</script>"


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # not there yet (connection refused, element missing)
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}\n{summary()}"
    )


LAST: dict[str, Any] = {}  # the last snapshot read, for the failure messages


def api(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/swarm", timeout=10) as reply:
        LAST["snapshot"] = json.load(reply)
    return LAST["snapshot"]


def summary() -> str:
    snapshot = LAST.get("snapshot") or {}
    lines = [f"round {snapshot.get('round')} errors {snapshot.get('errors')}"]
    lines += [f"{e['uid']}: alive={e['alive']} servers={e['servers']} unreachable="
              f"{e['unreachable']}" for e in snapshot.get("experts", [])]  # fmt: skip
    for kind in ("servers", "trainers"):
        lines += [f"{kind}: {r['address']} reachable={r['reachable']} error={r.get('error')}"
                  for r in snapshot.get(kind, [])]  # fmt: skip
    return "\n".join(lines)


def declare_hostile(dht_address: str, dead_address: str) -> None:
    """A stranger's announcements whose free-text fields hold markup (own key, own slot)."""

    async def put() -> None:
        async with DHTClient([dht_address], identity=Identity.generate()) as client:
            expiration = client.now() + 600
            grid = GridAnnouncement(
                "ffn", (4, 4), dead_address, version=MARKUP_VERSION, expert_cls=MARKUP_CLASS
            )
            trainer = TrainerAnnouncement(MARKUP_RUN, dead_address, model="<i>m</i>")
            stored = await client.put(
                [
                    (GRIDS_KEY, "ffn", grid.encode(), expiration),
                    (TRAINERS_KEY, MARKUP_RUN, trainer.encode(), expiration),
                ],
                owned=True,
            )
            assert all(stored)

    asyncio.run(put())


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    out = subprocess.run(
        ["bash", "scripts/ensure-chromium.sh"], cwd=ROOT, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    if out.returncode != 0:
        pytest.fail(f"no Chromium: {out.stderr[-2000:]}")
    browser, driver = out.stdout.strip().splitlines()[-1].split()
    return browser, driver


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logdir = tmp_path_factory.mktemp("explorer")
    procs: list[Proc] = []
    try:
        dht = Proc("dht", ["services.dht", "--metrics-port", "-1"], logdir)
        procs.append(dht)
        dht.wait_healthy()
        experts = []
        for i in range(2):
            args = [
                "services.expert", "--experts", f"ffn.[0:4].[{2 * i}:{2 * i + 2}]",
                "--hidden-dim", str(H), "--initial-peers", dht.address, "--update-period",
                str(PERIOD), "--metrics-port", "-1", "--compute-threads", "1",
                "--torch-threads", "1", "--seed", str(i),
            ]  # fmt: skip
            experts.append(Proc(f"expert{i}", args, logdir))
        procs += experts
        http_port = free_port()
        explorer = Proc(
            "explorer",
            ["services.explorer", "--initial-peers", dht.address, "--http-port", str(http_port),
             "--update-period", str(PERIOD), "--rpc-timeout", "2", "--metrics-port", "-1"],
            logdir,
        )  # fmt: skip
        procs.append(explorer)
        for proc in (*experts, explorer):
            proc.wait_healthy()
        trainer = Proc(
            "trainer",
            ["services.trainer", "--initial-peers", dht.address, "--grid", "4x4",
             "--hidden-dim", str(H), "--k-best", "2", "--metrics-port", "-1",
             "--announce-period", str(PERIOD), "--eval-every", "0", "--seed", "0",
             "--run-id", "browser-run"],
            logdir,
        )  # fmt: skip
        procs.append(trainer)
        trainer.wait_healthy()
        dead = f"127.0.0.1:{free_port()}"
        declare_hostile(dht.address, dead)
        yield {
            "logdir": logdir,
            "http": http_port,
            "dht": dht,
            "experts": experts,
            "trainer": trainer,
            "explorer": explorer,
            "dead": dead,
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def chromium(paths: tuple[str, str], profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=paths[1]), options=options)


def shown(driver: Any) -> tuple[dict[str, str], int]:
    """uid -> class of every cell of the rendered map, and the round they show (read in one
    script: the page may refresh between two)."""
    found = driver.execute_script(
        "const out = {};"
        "for (const td of document.querySelectorAll('td.cell[data-uid]'))"
        "  out[td.getAttribute('data-uid')] = td.className;"
        "const m = document.getElementById('meta');"
        "return [out, m ? Number(m.dataset.round) : 0];"
    )
    return found[0], int(found[1])


def cells(driver: Any) -> dict[str, str]:
    return shown(driver)[0]


def test_explorer_shows_the_swarm_in_a_browser(
    swarm: dict[str, Any], browser_paths: tuple[str, str]
) -> None:
    port, (server_a, server_b) = swarm["http"], swarm["experts"]
    expected = {
        f"ffn.{i}.{j}": (server_a if j < 2 else server_b).address
        for i in range(4)
        for j in range(4)
    }

    # the API: every uid alive, on the server that hosts it
    def all_alive() -> bool:
        experts = {e["uid"]: e for e in api(port)["experts"]}
        return all(
            uid in experts and experts[uid]["alive"] and experts[uid]["servers"] == [address]
            for uid, address in expected.items()
        )

    wait_for("every uid alive in /api/swarm", all_alive, 120)
    data = wait_for(
        "the trainer and the stranger's announcements in /api/swarm",
        lambda: (
            (d := api(port))
            and any(t["reachable"] and t["run_id"] == "browser-run" for t in d["trainers"])
            and any(s["address"] == swarm["dead"] for s in d["servers"])
            and d
        ),
        60,
    )
    assert {"experts", "servers", "trainers", "dht_nodes", "updated"} <= set(data)
    servers = {s["address"]: s for s in data["servers"]}
    for proc in (server_a, server_b):
        row = servers[proc.address]
        assert row["reachable"] and row["num_experts"] == 8 and row["version"]
    stranger = servers[swarm["dead"]]
    assert not stranger["reachable"] and stranger["version"] == MARKUP_VERSION
    assert any(n["reachable"] and n["joined"] for n in data["dht_nodes"])
    assert any(t["run_id"] == MARKUP_RUN and not t["reachable"] for t in data["trainers"])

    # the page, in Chromium: every uid in the rendered grid; markup shown as text, not run
    driver = chromium(browser_paths, swarm["logdir"] / "chromium-profile")
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait_for(
            "every uid alive in the page",
            lambda: all("alive" in cells(driver).get(uid, "") for uid in expected),
            60,
        )
        text = driver.find_element("tag name", "body").text
        assert MARKUP_VERSION in text and MARKUP_RUN in text and MARKUP_CLASS in text
        assert driver.execute_script("return window.__pwned === undefined")
        assert not driver.find_elements("css selector", "main script, main img, main i")
        shots = {
            "laptop": (1280, 900, swarm["logdir"] / "explorer.png"),
            "phone": (390, 844, swarm["logdir"] / "explorer-phone.png"),
        }
        for width, height, path in shots.values():
            driver.set_window_size(width, height)
            driver.save_screenshot(str(path))
            assert path.stat().st_size > 10_000

        # kill one expert server: its cells turn dead within 3 update periods (rounds)
        killed_at = api(port)["round"]
        server_b.popen.send_signal(signal.SIGKILL)
        server_b.popen.wait(30)
        gone = {uid for uid, address in expected.items() if address == server_b.address}

        def dead_in_api() -> dict[str, Any] | None:
            snapshot = api(port)
            experts = {e["uid"]: e for e in snapshot["experts"]}
            dead = all(not experts[uid]["alive"] for uid in gone)
            kept = all(experts[uid]["alive"] for uid in expected.keys() - gone)
            return snapshot if dead and kept else None

        snapshot = wait_for("the killed server's uids dead in /api/swarm", dead_in_api, 60)
        assert snapshot["round"] - killed_at <= 3, (killed_at, snapshot["round"])

        def dead_in_page() -> int | None:
            classes, shown_round = shown(driver)
            dead = all("dead" in classes.get(uid, "") for uid in gone)
            kept = all("alive" in classes.get(uid, "") for uid in expected.keys() - gone)
            return shown_round if dead and kept else None

        shown_round = wait_for("the killed server's cells dead in the page", dead_in_page, 60)
        assert shown_round - killed_at <= 3, (killed_at, shown_round)
        driver.set_window_size(1280, 900)
        driver.save_screenshot(str(swarm["logdir"] / "explorer-after-kill.png"))
        print(f"screenshots in {swarm['logdir']}")
    finally:
        driver.quit()
