"""hivemind 1.1.12's own virtual environment, for the benchmarks that measure it beside dmoe.

Why a separate venv: hivemind pins its own grpcio, protobuf and pydantic ranges, which must
not leak into the dmoe environment. ``benchmarks/out/hivemind-venv`` (git-ignored) is made on
first use with ``hivemind==1.1.12`` and the CPU ``torch==2.13.0`` wheel (here from the local
wheel directory; elsewhere pass ``"--extra-index-url https://download.pytorch.org/whl/cpu"`` as
``pip_args``). The drivers (``hivemind_baseline.py``, ``hivemind_averaging.py``) run
themselves under its interpreter with an ``--inner`` flag for the hivemind side and read the
JSON object that side prints last (:func:`run_inner`).

Only the standard library here: this module is imported by both interpreters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
VENV = OUT / "hivemind-venv"
REQUIREMENTS = ["torch==2.13.0+cpu", "hivemind==1.1.12"]


def venv_python(pip_args: str = "") -> Path:
    """The hivemind venv's interpreter, made and installed first if it is not there yet."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if not python.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not stamp.exists() or stamp.read_text() != " ".join(REQUIREMENTS):
        cmd = [str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS, *pip_args.split()]
        subprocess.run(cmd, check=True)
        stamp.write_text(" ".join(REQUIREMENTS))
    return python


def hivemind_sockets() -> set[Path]:
    """hivemind's unix sockets (p2pd's and its clients', always under /tmp) that exist now."""
    return set(Path("/tmp").glob("hivemind-*.sock"))


def remove_stale_sockets(candidates: set[Path]) -> None:
    """Remove those of ``candidates`` that no process listens on any more (a replicated P2P
    client, as each averager has, leaves its socket file behind); a socket still bound,
    someone else's live run, is in /proc/net/unix and stays."""
    try:
        bound = {line.split()[-1] for line in Path("/proc/net/unix").read_text().splitlines()[1:]}
    except OSError:
        return
    for path in candidates:
        if str(path) not in bound:
            with suppress(OSError):
                path.unlink()


def run_inner(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` (a hivemind-side driver) in its own process group, stderr kept in ``log``,
    and return the JSON object on the last line of its stdout.

    hivemind's DHT and averager processes and their p2pd daemons stay in that group, so
    whatever outlives the driver (a timeout, a crash, a driver that ``os._exit``s past a stuck
    shutdown) is killed with the group rather than left running on a shared machine; the
    socket files the run left in /tmp are removed.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sockets_before = hivemind_sockets()
    out = log.with_name(log.name + ".stdout")
    # stdout to a file, not a pipe: a leftover process holding the pipe would hold the reader
    with log.open("w") as err, out.open("w+") as stdout:
        err.write(f"$ {' '.join(cmd)}\n")
        err.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=stdout, stderr=err, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: the driver's leftovers too
            proc.wait()
            remove_stale_sockets(hivemind_sockets() - sockets_before)
        stdout.seek(0)
        text = stdout.read()
        err.write(f"\n--- stdout\n{text}")
    out.unlink()
    lines = text.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[1:4])} failed ({proc.returncode}), see {log}")
    return json.loads(lines[-1])
