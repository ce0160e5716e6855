"""Addresses both ways (services/common/addresses.py): what a process agrees to dial, and who
is calling it (gRPC's ``context.peer()``), spelled once for every service."""

from __future__ import annotations

import logging

import pytest
from helpers import run_async, serve_expert

from services.common.addresses import is_peer_address, peer_host
from services.common.errors import CallError
from services.common.limits import peer_key
from services.dht.validation import caller_host


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.1.2.3:5000", "10.1.2.3"),
        ("ipv4:127.0.0.1:1", "127.0.0.1"),
        ("ipv6:[::1]:5", "::1"),
        ("ipv6:%5B::1%5D:5000", "::1"),  # how grpc quotes it
        ("ipv6:[2001:db8::0001]:1", "2001:db8::1"),  # one spelling per host
        ("ipv6:[::ffff:10.0.0.7]:9", "10.0.0.7"),  # IPv4-mapped: the IPv4 caller it is
        ("ipv6:[fe80::1%25eth0]:7", "fe80::1"),  # the zone is not part of the host
    ],
)
def test_peer_host_reads_tcp_callers(peer: str, host: str) -> None:
    assert peer_host(peer) == host
    # the rate limits, the DHT and the expert's rejection log all key a caller the same way
    assert peer_key(peer) == host
    assert caller_host(peer) == host


@pytest.mark.parametrize(
    "peer",
    ["unix:/tmp/sock", "unix-abstract:x", "", "garbage", "ipv4:", "ipv4:1.2.3:5",
     "ipv4:10.1.2.3", "ipv6:::1:5", "ipv6:[not-ip]:5", "ipv6:[::1]", "dns:///host:5"],
)  # fmt: skip
def test_peer_host_is_none_for_anything_else(peer: str) -> None:
    assert peer_host(peer) is None
    assert peer_key(peer) == peer  # a non-IP caller is keyed by its whole string
    assert caller_host(peer) == ""  # nothing to rewrite a loopback announce with


@pytest.mark.parametrize(
    ("address", "ok"),
    [("host:1", True), ("10.0.0.1:31330", True), ("[::1]:5", True), ("0.0.0.0:1", False),
     ("[::]:1", False), ("unix:/var/run/docker.sock", False), ("ipv4:1.2.3.4:5", False),
     ("host:0", False), ("host", False)],
)  # fmt: skip
def test_dialable_addresses(address: str, ok: bool) -> None:
    assert is_peer_address(address) is ok


@run_async
async def test_expert_rejection_log_keys_the_caller_by_its_ip(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The expert's rejection log used to key callers by ``ipv4:127.0.0.1`` (the scheme kept),
    unlike the rate limits; now both say ``127.0.0.1``."""
    import grpc
    import torch

    caplog.set_level(logging.WARNING)
    async with serve_expert(experts=["ffn.0"], hidden_dim=8) as (_server, client):
        with pytest.raises(CallError) as err:
            await client.forward("ffn.0", [torch.randn(2, 9)], timeout=60)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    sources = [getattr(r, "source", None) for r in caplog.records if hasattr(r, "reason")]
    assert sources and set(sources) == {"127.0.0.1"}, sources
