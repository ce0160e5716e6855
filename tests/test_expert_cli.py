"""The command line and the uid grammar: bad patterns are refused at start-up."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.expert_keys import declaration_items, is_valid_uid
from services.expert import uid as uids

ROOT = Path(__file__).resolve().parent.parent


def test_uid_grammar_and_patterns() -> None:
    assert is_valid_uid("ffn.3.14") and is_valid_uid("my_block.0")
    for bad in ("ffn", "ffn.", "ffn.03", "ffn.3.", ".3", "ffn.-1", "ffn.a", "3.4", "f f.1"):
        assert not is_valid_uid(bad), bad
    assert uids.expand(["ffn.[0:2].[3:5]"]) == ["ffn.0.3", "ffn.0.4", "ffn.1.3", "ffn.1.4"]
    assert uids.expand(uids.split_patterns("a.1, a.[0:2] b.7")) == ["a.1", "a.0", "b.7"]
    for bad in ("ffn.[2:2]", "ffn.[0:4", "ffn.[00:4]", "ffn", "ffn.[0:4].x", "ffn.[1:0]"):
        with pytest.raises(ValueError, match=r"pattern|range"):
            uids.expand([bad])


def test_random_choice_without_dht_is_distinct_and_bounded() -> None:
    chosen = asyncio.run(
        uids.choose_free_uids(["e.[0:100].[0:100]"], 20, None, rng=random.Random(1))
    )
    assert len(set(chosen)) == 20 and all(is_valid_uid(u) for u in chosen)
    with pytest.raises(ValueError, match="exceeds"):
        asyncio.run(uids.choose_free_uids(["e.[0:3]"], 4, None))


def test_declaration_items_follow_the_dht_key_scheme() -> None:
    items = declaration_items(["ffn.3.14", "ffn.3.15"], "10.0.0.5:31340", 123.0)
    keys = {(k, s) for k, s, v, e in items}
    assert keys == {
        ("ffn.3.14", ""), ("ffn.3.15", ""), ("ffn.3.", "14"), ("ffn.3.", "15"), ("ffn.", "3")
    }  # fmt: skip
    assert all(v == b"10.0.0.5:31340" and e == 123.0 for _, _, v, e in items)


def test_help_and_bad_pattern_at_startup() -> None:
    helped = subprocess.run(
        [sys.executable, "-m", "services.expert", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert helped.returncode == 0
    for flag in (
        "--experts", "--max-batch-size", "--simulate-failure-rate", "DMOE_EXPERTS",
        "--initial-peers", "--dht-peers", "DMOE_INITIAL_PEERS", "--clip-grad-norm",
        "--max-grad-norm-ratio", "DMOE_MAX_GRAD_NORM_RATIO", "--max-queue-bytes",
        "--max-free-dim", "--max-stream-bytes", "--max-receive-bytes", "DMOE_MAX_RECEIVE_BYTES",
    ):  # fmt: skip
        assert flag in helped.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "services.expert", "--no-dht", "--experts", "ffn.[0:4].0x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "bad expert pattern" in bad.stderr
    small = subprocess.run(
        [sys.executable, "-m", "services.expert", "--no-dht", "--port", "0", "--metrics-port",
         "-1", "--experts", "nop.0", "--expert-cls", "nop", "--hidden-dim", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "DMOE_MAX_RECEIVE_BYTES": "1000", "DMOE_MAX_STREAM_BYTES": "2000"},
    )  # fmt: skip
    assert small.returncode == 2
    assert "--max-receive-bytes" in small.stderr


def test_autograd_lazy_imports_are_paid_at_startup() -> None:
    """The first backward must not import sympy under the GIL while requests wait."""
    script = (
        "import sys\n"
        "from services.expert.server import ExpertConfig, ExpertServer\n"
        "name = 'torch.fx.experimental.symbolic_shapes'\n"
        "assert name not in sys.modules\n"
        "server = ExpertServer(ExpertConfig(experts=['nop.0'], expert_cls='nop', hidden_dim=8))\n"
        "server._build_backends(['nop.0'])\n"
        "assert name in sys.modules, 'not preloaded'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
