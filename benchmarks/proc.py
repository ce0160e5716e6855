"""Process helpers the benchmarks share: free local ports, CPU time read from /proc (of one
process or a whole process tree), stopping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (all held open while choosing)."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, all threads (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children lists of all its threads, recursively)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def tree_cpu(pid: int, exclude: frozenset[int] = frozenset()) -> float:
    """CPU seconds of ``pid`` and its live descendants, minus the subtrees rooted in
    ``exclude`` (user + system, all threads). A process that already exited counts nothing:
    read it while the tree is still up."""
    skip = set(exclude)
    for root in exclude:
        skip.update(descendants(root))
    return sum(cpu_seconds(p) for p in [pid, *descendants(pid)] if p not in skip)


def stop(procs: list[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM every process, then wait up to ``grace`` seconds in all (services checkpoint and
    leave cleanly on SIGTERM); whatever still runs then is killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
