"""Checkpoints with real server processes: SIGTERM loses nothing (weights, optimizer state and
step count restored exactly), kill -9 loses at most one period, old files are pruned."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from helpers import free_port, run_async, serve_expert

from services.common.healthcheck import wait_serving
from services.expert.backend import ExpertBackend, OptimizerConfig
from services.expert.checkpoints import list_checkpoints
from services.expert.client import ExpertClient
from services.expert.layers import get_expert_class
from services.expert.server import ExpertConfig, ExpertServer

ROOT = Path(__file__).resolve().parent.parent
H = 16


def _start(port: int, ckpt: Path, seed: int, every: float) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "services.expert", "--no-dht", "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", "-1", "--experts", "ffn.[0:2]",
        "--hidden-dim", str(H), "--seed", str(seed), "--checkpoint-dir", str(ckpt),
        "--checkpoint-every", str(every), "--checkpoint-keep", "2", "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT)


async def _wait_serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    def alive() -> bool:
        return proc.poll() is None

    address = f"127.0.0.1:{port}"
    if await asyncio.to_thread(wait_serving, address, 240, alive=alive, interval=0.1):
        return
    assert alive(), "expert server exited during start-up"
    raise TimeoutError("expert server did not become SERVING")


def _checkpoint(ckpt: Path, uid: str, steps: int) -> dict:
    (path,) = [p for p in list_checkpoints(ckpt, uid) if p.name.startswith(f"{steps:012d}-")]
    return torch.load(path, weights_only=True)


def test_sigterm_and_kill9_restore(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    port = free_port()
    torch.manual_seed(0)
    data = [(torch.randn(4, H), torch.randn(4, H)) for _ in range(4)]
    probe = torch.randn(3, H)

    async def scenario() -> None:
        # A: three steps on ffn.0, then SIGTERM
        proc = _start(port, ckpt, seed=1, every=0)
        try:
            await _wait_serving(port, proc)
            async with ExpertClient(f"127.0.0.1:{port}") as client:
                for x, g in data[:3]:
                    await client.backward("ffn.0", [x], [g], timeout=30)
                before = [(await client.forward(u, [probe]))[0] for u in ("ffn.0", "ffn.1")]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
        assert [p.name[:12] for p in list_checkpoints(ckpt, "ffn.0")] == [f"{3:012d}"]

        # B: another seed, so only the checkpoint can give the old weights back
        proc = _start(port, ckpt, seed=2, every=0.3)
        try:
            await _wait_serving(port, proc)
            async with ExpertClient(f"127.0.0.1:{port}") as client:
                assert (await client.info("ffn.0")).optimizer_steps == 3
                assert (await client.info("ffn.1")).optimizer_steps == 0
                for uid, old in zip(("ffn.0", "ffn.1"), before, strict=True):
                    assert torch.equal((await client.forward(uid, [probe]))[0], old)
                x, g = data[3]
                await client.backward("ffn.0", [x], [g], timeout=30)
                after_step = (await client.forward("ffn.0", [probe]))[0]
            deadline = time.monotonic() + 30  # the periodic checkpoint picks up step 4
            while not any(p.name.startswith(f"{4:012d}") for p in list_checkpoints(ckpt, "ffn.0")):
                assert time.monotonic() < deadline, "no periodic checkpoint"
                await asyncio.sleep(0.1)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()

        # C: after kill -9 the periodic checkpoint is there
        proc = _start(port, ckpt, seed=3, every=0)
        try:
            await _wait_serving(port, proc)
            async with ExpertClient(f"127.0.0.1:{port}") as client:
                assert (await client.info("ffn.0")).optimizer_steps == 4
                torch.testing.assert_close(
                    (await client.forward("ffn.0", [probe]))[0], after_step, atol=0, rtol=0
                )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()

    asyncio.run(scenario())

    # optimizer state was restored: replaying step 4 locally from the step-3 checkpoint gives
    # exactly the step-4 checkpoint (fresh Adam moments would give a different update)
    local = ExpertBackend("ffn.0", get_expert_class("ffn"), H, OptimizerConfig())
    local.load_state_dict(_checkpoint(ckpt, "ffn.0", 3))
    x, g = data[3]
    local.backward([x], [g])
    step4 = _checkpoint(ckpt, "ffn.0", 4)
    assert step4["steps"] == local.steps == 4
    for name, value in local.module.state_dict().items():
        torch.testing.assert_close(step4["model"][name], value, atol=1e-6, rtol=0)
    saved = step4["optimizer"]["state"]
    mine = local.optimizer.state_dict()["state"]
    for index, state in mine.items():
        for key, value in state.items():
            torch.testing.assert_close(saved[index][key], value, atol=1e-6, rtol=0)
    assert len(list_checkpoints(ckpt, "ffn.0")) == 2  # --checkpoint-keep 2
    assert not list((ckpt / "ffn.0").glob(".tmp-*"))


@run_async
async def test_checkpoint_write_does_not_block_compute(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """While a checkpoint is being written (held inside ``torch.save`` here until the test lets
    it go), the expert keeps computing: a backward and a forward complete. The file holds the
    state of the moment it was taken (step 1), not the step taken during the write."""
    entered, release = threading.Event(), threading.Event()
    real_save = torch.save

    def held_save(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(60), "the test never released the checkpoint write"
        return real_save(*args, **kwargs)

    async with serve_expert(
        experts=["ffn.0"], hidden_dim=H, seed=1, checkpoint_dir=str(tmp_path),
        checkpoint_every=0,
    ) as (server, client):  # fmt: skip
        x, g = torch.randn(4, H), torch.randn(4, H)
        await client.backward("ffn.0", [x], [g], timeout=30)
        backend = server.backends["ffn.0"]
        with backend.lock:
            step1 = {k: v.clone() for k, v in backend.module.state_dict().items()}
        monkeypatch.setattr(torch, "save", held_save)
        writing = asyncio.create_task(server.checkpoint_now())
        try:
            assert await asyncio.to_thread(entered.wait, 60), "no checkpoint write started"
            await client.backward("ffn.0", [x], [g], timeout=30)
            await client.forward("ffn.0", [x], timeout=30)
            assert backend.steps == 2
        finally:
            release.set()
            await writing
        monkeypatch.setattr(torch, "save", real_save)
        saved = _checkpoint(tmp_path, "ffn.0", 1)
        assert saved["steps"] == 1
        for name, value in step1.items():
            assert torch.equal(saved["model"][name], value), name


@run_async
async def test_a_checkpoint_with_non_finite_values_is_skipped(tmp_path: Path) -> None:
    """A newest checkpoint holding NaN (written before steps were guarded) is not restored: the
    server falls back to the previous one, so the poison does not come back."""
    from services.expert.checkpoints import save

    local = ExpertBackend("ffn.0", get_expert_class("ffn"), H, OptimizerConfig())
    local.backward([torch.randn(4, H)], [torch.randn(4, H)])
    good = local.snapshot_state()
    save(good, tmp_path, keep=3)
    poisoned = local.snapshot_state()
    poisoned["steps"] = 2
    next(iter(poisoned["model"].values())).view(-1)[0] = float("nan")
    save(poisoned, tmp_path, keep=3)

    config = ExpertConfig(experts=["ffn.0"], hidden_dim=H, seed=9,
                          checkpoint_dir=str(tmp_path), checkpoint_every=0)  # fmt: skip
    server = await ExpertServer(config).start()
    try:
        backend = server.backends["ffn.0"]
        assert backend.steps == 1
        for name, value in backend.module.state_dict().items():
            assert torch.equal(value, good["model"][name]), name
    finally:
        await server.stop(0.5)
