"""One source of defaults: the flags of ``python -m services.expert`` and ``services.trainer``
default to what ``ExpertConfig`` / ``OptimizerConfig`` / ``CallPolicy`` say, so an in-process
server or layer behaves as the command line does, and a default changes in one place."""

from __future__ import annotations

import dataclasses
import os

import pytest

from services.expert.__main__ import build_parser as expert_parser
from services.expert.__main__ import config_from_args
from services.expert.server import ExpertConfig
from services.trainer.flags import build_parser as trainer_parser
from services.trainer.options import CallPolicy, MoEOptions

# per-process settings the common parser owns (a service's well-known ports, bind address,
# its peers) or that only exist in-process (TLS and limits objects, the host name)
PROCESS_ONLY = {
    "host", "port", "metrics_port", "max_message_bytes", "dht_peers", "identity_file", "tls",
    "limits", "announce_host", "hostname",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("DMOE_")]:
        monkeypatch.delenv(var)


def test_expert_flags_default_to_expert_config() -> None:
    from_flags = config_from_args(expert_parser().parse_args(["--no-dht"]))
    defaults = ExpertConfig()
    compared = [f.name for f in dataclasses.fields(ExpertConfig) if f.name not in PROCESS_ONLY]
    assert "optimizer" in compared and "batch_timeout_ms" in compared
    for name in compared:
        assert getattr(from_flags, name) == getattr(defaults, name), name


def test_trainer_flags_default_to_call_policy_and_moe_options() -> None:
    args = trainer_parser().parse_args([])
    policy = CallPolicy()
    for field in dataclasses.fields(CallPolicy):
        if not field.init:  # state the policy keeps (the running answer figures), not a flag
            continue
        assert getattr(args, field.name) == getattr(policy, field.name), field.name
    layer = MoEOptions()
    assert (args.grid, args.uid_prefix, args.moe_kind, args.k_best) == (
        layer.grid_size,
        layer.uid_prefix,
        layer.kind,
        layer.k_best,
    )
    # what trainers have run with from the command line: 5 s per call, 0.5 s for stragglers
    assert (policy.forward_timeout, policy.timeout_after_k_min) == (5.0, 0.5)
    assert policy.backward_timeout == 5.0
