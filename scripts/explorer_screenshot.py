"""Take the README's screenshots of the swarm explorer (docs/explorer.png, docs/explorer-phone.png).

Starts a small swarm as local processes (a DHT node, three expert servers covering most of an
``ffn`` 4x4 grid, one column twice and two cells not at all, a trainer, the explorer), waits
until the trainer has trained a little, and photographs the page in headless Chromium at a
laptop's and a phone's size. Needs ``chromium`` and ``chromedriver`` (scripts/ensure-chromium.sh)
and the ``test`` extra (selenium). About a minute.

    python scripts/explorer_screenshot.py [--out docs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def start(procs: list, logdir: Path, name: str, *args: str) -> str:
    port = free_port()
    with open(logdir / f"{name}.log", "w") as log:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", *args, "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", "-1"],
            cwd=ROOT, env=ENV, stdout=log, stderr=log,
        ))  # fmt: skip
    return f"127.0.0.1:{port}"


def wait_for(what: str, predicate, timeout: float) -> object:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if result := predicate():
                return result
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs"), help="folder of the PNG files")
    out = Path(parser.parse_args().out)
    browser, driver_path = (
        subprocess.run(["bash", str(ROOT / "scripts/ensure-chromium.sh")], check=True,
                       capture_output=True, text=True).stdout.split()[-2:]
    )  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as tmp, processes() as procs:
        logdir = Path(tmp)
        dht = start(procs, logdir, "dht", "services.dht")
        common = ["--hidden-dim", "16", "--initial-peers", dht, "--update-period", "3",
                  "--compute-threads", "1", "--torch-threads", "1"]  # fmt: skip
        for i, grid in enumerate(["ffn.[0:4].[0:2]", "ffn.[0:4].[1:3]", "ffn.[0:2].[3:4]"]):
            start(procs, logdir, f"expert{i}", "services.expert", "--experts", grid, *common)
        http = free_port()
        start(procs, logdir, "explorer", "services.explorer", "--initial-peers", dht,
              "--http-port", str(http), "--update-period", "3")  # fmt: skip
        api = f"http://127.0.0.1:{http}/api/swarm"

        def alive() -> int:
            return sum(e["alive"] for e in json.load(urllib.request.urlopen(api))["experts"])

        wait_for("the explorer to see 14 live experts", lambda: alive() == 14, 240)
        start(procs, logdir, "trainer", "services.trainer", "--initial-peers", dht, "--grid",
              "4x4", "--hidden-dim", "16", "--k-best", "4", "--announce-period", "3")  # fmt: skip
        wait_for("the trainer to train", lambda: any(
            (t.get("step") or 0) > 200 for t in json.load(urllib.request.urlopen(api))["trainers"]
        ), 240)  # fmt: skip
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                     f"--user-data-dir={logdir / 'profile'}"):  # fmt: skip
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            for name, (width, height) in {"explorer.png": (1280, 1000),
                                          "explorer-phone.png": (390, 844)}.items():  # fmt: skip
                driver.set_window_size(width, height)
                driver.get(f"http://127.0.0.1:{http}/")
                time.sleep(1)
                driver.save_screenshot(str(out / name))
                print(f"wrote {out / name}")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
