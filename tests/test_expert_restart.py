"""A scaled replica (``--num-experts``) restarted on the same checkpoint volume hosts the same
experts again, restores their checkpoints, and does not collide with another replica's
choice; every hosted expert has its metric series from the first scrape."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import run_async

from services.expert.server import ExpertConfig, ExpertServer

H = 8


def _config(ckpt: Path, hostname: str, seed: int) -> ExpertConfig:
    return ExpertConfig(
        experts=["rst.[0:50].[0:50]"], num_experts=3, hidden_dim=H, seed=seed,
        checkpoint_dir=str(ckpt), checkpoint_every=0, hostname=hostname,
    )  # fmt: skip


@run_async
async def test_restarted_replica_hosts_and_restores_the_same_experts(tmp_path: Path) -> None:
    first = await ExpertServer(_config(tmp_path, "replica-a", seed=1)).start()
    other = await ExpertServer(_config(tmp_path, "replica-b", seed=2)).start()
    try:
        chosen, others = list(first.backends), list(other.backends)
        assert len(chosen) == 3 and set(chosen).isdisjoint(others)
        for uid in chosen:  # series exist at 0 before any request
            assert (
                first.registry.get_sample_value(
                    "dmoe_expert_optimizer_steps_total", {"expert": uid}
                )
                == 0.0
            )
            for method in ("forward", "backward"):
                labels = {"expert": uid, "method": method, "code": "OK"}
                assert first.registry.get_sample_value("dmoe_expert_requests_total", labels) == 0.0
        steps = [
            s for m in first.registry.collect() if m.name == "dmoe_expert_optimizer_steps"
            for s in m.samples if s.name.endswith("_total")
        ]  # fmt: skip
        assert sorted(s.labels["expert"] for s in steps) == sorted(chosen)
        backend = first.backends[chosen[0]]
        with backend.lock:
            backend.backward([torch.randn(4, H)], [torch.randn(4, H)])
        weights = {k: v.clone() for k, v in backend.module.state_dict().items()}
        key = first.identity.public_key
        assert key != other.identity.public_key
    finally:
        await first.stop(0.5)  # checkpoints on stop
        await other.stop(0.5)
    files = sorted(p.name for p in (tmp_path / "hosts").iterdir())
    assert files == ["replica-a.json", "replica-a.key", "replica-b.json", "replica-b.key"]
    assert (tmp_path / "hosts" / "replica-a.key").stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "hosts" / "replica-a.json").read_text())["uids"] == chosen

    # same hostname, another seed (a fresh random choice would differ): same experts back
    again = await ExpertServer(_config(tmp_path, "replica-a", seed=99)).start()
    try:
        assert list(again.backends) == chosen
        assert again.identity.public_key == key  # it still owns its declarations
        restored = again.backends[chosen[0]]
        assert restored.steps == 1
        for k, v in restored.module.state_dict().items():
            torch.testing.assert_close(v, weights[k], atol=0, rtol=0)
    finally:
        await again.stop(0.5)

    # a file that no longer fits the flags (other count) is replaced by a new choice
    changed = _config(tmp_path, "replica-a", seed=5)
    changed.num_experts = 2
    fresh = await ExpertServer(changed).start()
    try:
        assert len(fresh.backends) == 2
    finally:
        await fresh.stop(0.5)
    saved = json.loads((tmp_path / "hosts" / "replica-a.json").read_text())["uids"]
    assert saved == list(fresh.backends)
