"""DHTClient per the contract (docs/contracts.md), against real nodes."""

import asyncio
import socket
import time

import pytest
from helpers import Proc, run_async

from services.dht.client import DHTClient, DHTUnavailable, ValueWithExpiration
from services.dht.clock import ReplyClock
from services.dht.server import start_node


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@run_async
async def test_client_put_get_contract() -> None:
    a = await start_node()
    b = await start_node(initial_peers=[a.address])
    await asyncio.wait_for(b.node.joined.wait(), 10)
    try:
        now = time.time()
        # a dead first node is skipped: the next one answers
        async with DHTClient([dead_address(), b.address], timeout=2.0) as client:
            stored = await client.put(
                [
                    ("ffn.3.14", None, b"10.0.0.5:31340", now + 30),
                    ("ffn.3.", "14", b"10.0.0.5:31340", now + 30),
                    (b"ffn.", b"3", b"10.0.0.5:31340", now + 30),
                    ("old", None, b"x", now - 1),
                ]
            )
            assert stored == [True, True, True, False]
            assert await client.put([]) == []
            assert await client.get([]) == {}
        async with DHTClient(a.address) as client:
            found = await client.get(["ffn.", b"ffn.3.", "ffn.3.14", "old", "nothing"])
        assert set(found) == {"ffn.", b"ffn.3.", "ffn.3.14", "old", "nothing"}
        assert found["ffn.3.14"] == ValueWithExpiration(b"10.0.0.5:31340", now + 30)
        assert found[b"ffn.3."] == {b"14": [ValueWithExpiration(b"10.0.0.5:31340", now + 30)]}
        assert found["ffn."] == {b"3": [ValueWithExpiration(b"10.0.0.5:31340", now + 30)]}
        assert found["old"] is None and found["nothing"] is None

        client = DHTClient([a.address])
        # another subkey does not erase the first; latest merges
        assert await client.put([("ffn.", "4", b"h:2", now + 20)]) == [True]
        latest = await client.get(["ffn."], latest=True)
        assert set(latest["ffn."]) == {b"3", b"4"}
        with pytest.raises(ValueError, match="key is"):
            await client.put([("k" * 1000, None, b"v", now + 10)])
        with pytest.raises(ValueError, match="finite"):
            await client.put([("k", None, b"v", float("inf"))])
        await client.close()

        with pytest.raises(DHTUnavailable):
            async with DHTClient([dead_address()], timeout=1.0) as nobody:
                await nobody.get(["ffn."])
        assert issubclass(DHTUnavailable, ConnectionError)
    finally:
        await b.stop(0)
        await a.stop(0)


def test_reply_clock_ignores_round_trip_noise_and_follows_a_real_skew() -> None:
    """One reply's offset is off by up to half its round trip: following each one made the
    client's time go back, and an expert's renewal look older than its last declaration."""
    host = [1000.0]
    clock = ReplyClock(max_skew=10.0, window=4, source=lambda: host[0])
    readings = []
    for noise in (1.5, -2.0, 3.0, -1.0, 2.5):  # slow replies: seconds of noise, no skew
        clock.observe(host[0] + noise, sent=host[0])
        readings.append(clock.now())
        host[0] += 0.1
    assert readings == sorted(readings) and clock.offset == 0.0
    clock.observe(0.0, sent=host[0])  # "not said" and garbage change nothing
    clock.observe(float("nan"), sent=host[0])
    assert clock.offset == 0.0
    for noise in (30.5, 29.0, 31.0, 30.0):  # the host runs 30 s behind the DHT
        clock.observe(host[0] + noise, sent=host[0])
    assert 29.5 <= clock.offset <= 31.0 and clock.now() == host[0] + clock.offset
    for offset in (8.0, 7.0, 9.0, 8.0):  # under the threshold, above half of it: no flip
        clock.observe(host[0] + offset, sent=host[0])
        assert clock.offset >= 7.0
    for _ in range(4):
        clock.observe(host[0] + 1.0, sent=host[0])
    assert clock.offset == 0.0


def test_one_client_across_successive_asyncio_runs(tmp_path) -> None:
    # a script that drives one client from several asyncio.run calls (a notebook, a sync
    # wrapper): each run is a new event loop and a gRPC channel belongs to the loop that made
    # it, so the client dials afresh on the new one (it raised "Event loop is closed" before).
    # The node is a process of its own: it must outlive the test's loops.
    node = Proc("dht", ["services.dht", "--metrics-port", "-1"], tmp_path)
    try:
        node.wait_healthy()
        client = DHTClient(node.address, timeout=10.0)
        now = time.time()
        assert asyncio.run(client.put([("loops", None, b"first", now + 60)])) == [True]
        found = asyncio.run(client.get(["loops"]))["loops"]
        assert found is not None and found.value == b"first"
        assert asyncio.run(client.put([("loops", None, b"second", now + 70)])) == [True]

        async def last() -> bytes:
            async with client:  # closing it on this loop, not the first one
                found = (await client.get(["loops"]))["loops"]
                assert isinstance(found, ValueWithExpiration)
                return found.value

        assert asyncio.run(last()) == b"second"
    finally:
        node.stop()
