"""Attacks on the swarm through the DHT, played over the wire by a hostile client.

Each test judges the outcome by what the honest parties see: a trainer's beam search still
finds the honest experts, a layer still trains through them, the expert server's own renewals
are still accepted. The swarm: three real DHT nodes and one real expert server (in-process
gRPC on 127.0.0.1), and a trainer-side :class:`Swarm`.
"""

import asyncio
import os
import time

import grpc
import pytest
import torch
from helpers import run_async, until
from prometheus_client import CollectorRegistry

from services.common.identity import Identity
from services.dht.client import DHTClient
from services.dht.config import NodeConfig
from services.dht.records import record_message, sign_entry
from services.dht.routing import id_to_bytes, key_to_id
from services.dht.server import start_node
from services.expert.server import ExpertConfig, ExpertServer
from services.proto import dht_pb2, dht_pb2_grpc
from services.trainer.dispatch import CallPolicy
from services.trainer.metrics import TrainerMetrics
from services.trainer.moe import RemoteMixtureOfExperts
from services.trainer.swarm import Swarm

H = 8
DAY = 86_400.0


@pytest.fixture(scope="module")
def swarm():
    swarm = Swarm(None, metrics=TrainerMetrics(CollectorRegistry()), cache_ttl=0.0)
    nodes = [swarm.run(start_node())]
    for _ in range(2):
        nodes.append(swarm.run(start_node(initial_peers=[nodes[0].address])))

    async def joined() -> None:
        await asyncio.wait_for(asyncio.gather(*(n.node.joined.wait() for n in nodes)), 30)

    swarm.run(joined())
    swarm.initial_peers = [nodes[1].address]
    server = swarm.run(
        ExpertServer(
            ExpertConfig(
                experts=["ffn.[0:2].[0:2]"],
                hidden_dim=H,
                seed=0,
                dht_peers=[nodes[2].address],
                update_period=30,
            )
        ).start()
    )
    swarm.run(server.declarer.first_success.wait(), timeout=30)
    swarm.nodes, swarm.server = nodes, server
    yield swarm
    swarm.run(server.stop(0))
    for node in nodes:
        swarm.run(node.stop())
    swarm.close()


def honest_view(swarm: Swarm) -> dict[str, dict[int, list[str]]]:
    return swarm.run(swarm.children(["ffn.", "ffn.0.", "ffn.1."]))


def assert_honest_experts_found(swarm: Swarm) -> None:
    """The trainer sees every honest expert at the honest address, and trains through them."""
    view = honest_view(swarm)
    address = swarm.server.address
    assert set(view["ffn."]) == {0, 1}
    for prefix in ("ffn.0.", "ffn.1."):
        assert set(view[prefix]) == {0, 1}
        assert all(address in servers for servers in view[prefix].values()), view
    layer = RemoteMixtureOfExperts(
        H, (2, 2), "ffn", k_best=2, swarm=swarm, policy=CallPolicy(forward_timeout=10)
    )
    x = torch.randn(6, H)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def stubs(address: str):
    channel = grpc.aio.insecure_channel(address)
    return channel, dht_pb2_grpc.DHTStub(channel), dht_pb2_grpc.DHTPeerStub(channel)


def plain_entry(value: bytes, expiration: float, subkey: bytes | None = None):
    entry = dht_pb2.ValueEntry(value=value, expiration=expiration)
    if subkey is not None:
        entry.subkey = subkey
    return entry


def test_erase_a_prefix_with_a_plain_value_is_refused(swarm) -> None:
    """A plain value with a far expiration on ``ffn.`` used to replace the dictionary of live
    coordinates (and block every renewal): now it is refused on every node."""

    async def attack() -> None:
        key_id = id_to_bytes(key_to_id(b"ffn."))
        for node in swarm.nodes:
            channel, dht, peer = stubs(node.address)
            async with channel:
                far = plain_entry(b"gone", time.time() + DAY - 60)
                reply = await dht.Put(
                    dht_pb2.PutRequest(items=[dht_pb2.PutItem(key=b"ffn.", entry=far)])
                )
                assert list(reply.stored) == [False]
                reply = await peer.Store(
                    dht_pb2.StoreRequest(items=[dht_pb2.StoreItem(key_id=key_id, entry=far)])
                )
                assert list(reply.stored) == [False]
                # beyond the node's --max-ttl: refused outright, with the reason
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await dht.Put(
                        dht_pb2.PutRequest(
                            items=[
                                dht_pb2.PutItem(
                                    key=b"ffn.", entry=plain_entry(b"x", time.time() + 30 * DAY)
                                )
                            ]
                        )
                    )
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "--max-ttl" in err.value.details()

    swarm.run(attack())
    for node in swarm.nodes:  # what a republish would spread: only owned entries are held
        for entry in node.node.storage.get(key_to_id(b"ffn.")):
            assert entry.owner == swarm.server.identity.public_key
    assert swarm.run(swarm.server.declarer.declare_once())  # renewals still accepted
    assert_honest_experts_found(swarm)


def test_hijack_an_expert_uid_is_refused(swarm) -> None:
    """Pointing an honest expert's uid elsewhere: nobody can write the server's own slot
    (unsigned, forged or replayed), and a stranger's own declaration of the same uid is a
    separate entry that private swarms ignore."""
    honest = swarm.server.identity.public_key
    attacker = Identity.generate()
    first = swarm.run(DHTClient([swarm.nodes[0].address]).get(["ffn.0."]))["ffn.0."]
    captured = next(v for v in first[b"1"] if v.owner == honest)  # an old declaration

    async def attack() -> None:
        now = time.time()
        async with DHTClient([swarm.nodes[0].address], identity=attacker) as client:
            # an unowned entry with a far expiration, and the attacker's own owned one
            assert await client.put([("ffn.0.", "1", b"127.0.0.1:9", now + DAY - 60)]) == [True]
            stored = await client.put([("ffn.0.", "1", b"127.0.0.1:9", now + DAY - 60)], owned=True)
            assert stored == [True]
        key = id_to_bytes(key_to_id(b"ffn.0."))
        forged = dht_pb2.ValueEntry(
            subkey=b"1", value=b"127.0.0.1:9", expiration=now + 600, owner=honest,
            signature=attacker.sign(record_message(key, b"1", b"127.0.0.1:9", now + 600)),
        )  # fmt: skip
        channel, dht, peer = stubs(swarm.nodes[1].address)
        async with channel:
            for call in (
                dht.Put(dht_pb2.PutRequest(items=[dht_pb2.PutItem(key=b"ffn.0.", entry=forged)])),
                peer.Store(
                    dht_pb2.StoreRequest(items=[dht_pb2.StoreItem(key_id=key, entry=forged)])
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "signature" in err.value.details()

    swarm.run(attack())
    assert swarm.run(swarm.server.declarer.declare_once())  # the renewal is not refused

    async def replay() -> list[bool]:
        # the server's own, correctly signed, older declaration: loses to the newer one
        key = id_to_bytes(key_to_id(b"ffn.0."))
        old = dht_pb2.ValueEntry(
            subkey=b"1", value=captured.value, expiration=captured.expiration, owner=honest,
            signature=sign_entry(swarm.server.identity, key, b"1", captured.value,
                                 captured.expiration).signature,
        )  # fmt: skip
        channel, _, peer = stubs(swarm.nodes[0].address)
        async with channel:
            reply = await peer.Store(
                dht_pb2.StoreRequest(items=[dht_pb2.StoreItem(key_id=key, entry=old)])
            )
        return list(reply.stored)

    assert swarm.run(replay()) == [False]
    assert_honest_experts_found(swarm)
    view = honest_view(swarm)["ffn.0."][1]
    assert sorted(view) == sorted([swarm.server.address, "127.0.0.1:9"])  # an open swarm: both
    private = Swarm(swarm.initial_peers, cache_ttl=0.0, trusted=frozenset({honest}))
    try:
        assert private.run(private.children(["ffn.0."]))["ffn.0."][1] == [swarm.server.address]
    finally:
        private.close()


def test_strip_a_replica_with_demote_is_refused(swarm) -> None:
    """A ``demote`` for an entry learned through Find would strip it from a replica: it
    needs the token only the storing node received."""
    key_id = key_to_id(b"ffn.")
    holder = next(n for n in swarm.nodes if n.node.storage.get(key_id))
    before = holder.node.storage.get(key_id)

    async def attack() -> list[bool]:
        channel, _, peer = stubs(holder.address)
        async with channel:
            found = await peer.Find(dht_pb2.FindRequest(key_ids=[id_to_bytes(key_id)]))
            items = [
                dht_pb2.StoreItem(key_id=id_to_bytes(key_id), entry=e, demote=True,
                                  demote_token=os.urandom(16))
                for e in found.results[0].entries
            ]  # fmt: skip
            reply = await peer.Store(dht_pb2.StoreRequest(items=items))
        return list(reply.stored)

    assert swarm.run(attack()) == [False] * len(before)
    assert holder.node.storage.get(key_id) == before
    assert holder.node.rejections.count("demote_token") >= len(before)
    assert_honest_experts_found(swarm)


def test_forged_peers_never_enter_routing_tables(swarm) -> None:
    """Claims in ``sender``: non-TCP targets are refused, an id claimed for an honest peer's
    address is checked there (the honest peer stays), and an address that cannot prove an id
    never enters a table."""
    victim, honest = swarm.nodes[0], swarm.nodes[1]
    fake_id = os.urandom(20)

    async def attack() -> None:
        channel, _, peer = stubs(victim.address)
        async with channel:
            for address in ("unix:/var/run/docker.sock", "dns:///evil:1", "127.0.0.1:0",
                            "0.0.0.0:31330", "[::]:1", "", "ipv4:1.2.3.4:5", "a b:1"):  # fmt: skip
                sender = dht_pb2.NodeInfo(node_id=fake_id, address=address)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await peer.Ping(dht_pb2.PingRequest(sender=sender))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # a fake id for the honest peer's address, and one where nobody answers
            for address in (honest.address, "127.0.0.1:9"):
                sender = dht_pb2.NodeInfo(node_id=fake_id, address=address)
                await peer.Find(dht_pb2.FindRequest(sender=sender, key_ids=[fake_id]))
        for _ in range(100):  # the checks run in the background
            if not victim.node._verifying:
                break
            await asyncio.sleep(0.05)

    swarm.run(attack())
    table = victim.node.table
    assert int.from_bytes(fake_id, "big") not in table
    assert table.address_of(honest.node.node_id) == honest.address  # not evicted
    assert "127.0.0.1:9" not in table.contacts().values()
    assert victim.node.rejections.count("bad_address") >= 5
    assert_honest_experts_found(swarm)


def test_malformed_declarations_cannot_crash_or_mislead_a_trainer(swarm) -> None:
    """Non-UTF-8 values, bad coordinates, non-TCP addresses, unsigned entries: all written
    correctly signed by a stranger (or unowned), all skipped and counted by the trainer."""
    attacker = Identity.generate()
    bad = [
        ("ffn.0.", b"\xff\xfe", b"127.0.0.1:1"),
        ("ffn.0.", "1", b"\xff\xfe\xfd"),
        ("ffn.1.", "0", b"unix:/var/run/docker.sock"),
        ("ffn.1.", "1", b"127.0.0.1:0"),
        ("ffn.", "-1", b"127.0.0.1:1"),
        ("ffn.", "01", b"127.0.0.1:1"),
        ("ffn.", "99999999", b"127.0.0.1:1"),
    ]

    async def attack() -> None:
        expiration = time.time() + 600
        async with DHTClient([swarm.nodes[2].address], identity=attacker) as client:
            items = [(key, sub, value, expiration) for key, sub, value in bad]
            assert await client.put(items, owned=True) == [True] * len(items)
            assert await client.put([("ffn.1.", "0", b"\xff", expiration)]) == [True]  # unowned

    swarm.run(attack())
    rejected = swarm.rejections
    before = {
        r: rejected.count(r) for r in ("bad_address", "bad_coordinate", "unowned_declaration")
    }
    assert_honest_experts_found(swarm)  # no crash, and only the honest server is used
    view = honest_view(swarm)
    seen = {address for level in view.values() for s in level.values() for address in s}
    assert seen.isdisjoint({"127.0.0.1:1", "127.0.0.1:0", "unix:/var/run/docker.sock"}), view
    assert {coord for level in view.values() for coord in level} == {0, 1}
    assert rejected.count("bad_address") > 0 and rejected.count("bad_coordinate") > 0
    assert rejected.count("unowned_declaration") > 0
    assert sum(rejected.count(r) for r in before) > sum(before.values())


@run_async
async def test_expiration_cap_and_a_skewed_clock() -> None:
    """A node whose host clock runs 30 s ahead used to refuse every declaration: it now
    corrects its DHT time from its peers' median; a peer whose clock is off gets its entries
    kept only as long as its own clock says; expirations are capped."""

    # the clock counts each host once: the honest peers live on three loopback IPs
    honest = [await start_node(host="127.0.0.2", announce_host="127.0.0.2")]
    for ip in ("127.0.0.3", "127.0.0.4"):
        honest.append(
            await start_node(host=ip, announce_host=ip, initial_peers=[honest[0].address])
        )
    skewed = await start_node(
        NodeConfig(simulate_clock_offset=30.0), initial_peers=[n.address for n in honest]
    )
    try:
        await asyncio.wait_for(skewed.node.joined.wait(), 30)
        await until(lambda: skewed.node.clock.correction, 30, "a clock correction")
        assert -31 < skewed.node.clock.correction < -29  # it noticed and corrected
        async with DHTClient([skewed.address], identity=Identity.generate()) as client:
            await client.get(["probe"])
            assert abs(client.now() - time.time()) < 2  # clients get the corrected time
            expiration = client.now() + 20
            assert await client.put([("ffn.", "0", b"127.0.0.1:1", expiration)], owned=True) == [
                True
            ]
            found = await client.get(["ffn."], latest=True)
            assert [v.value for v in found["ffn."][b"0"]] == [b"127.0.0.1:1"]
        # a peer that claims a clock 100 s ahead: its 60-second entry is already over
        channel, _, peer = stubs(honest[1].address)
        async with channel:
            key = id_to_bytes(key_to_id(b"skewed"))
            item = dht_pb2.StoreItem(key_id=key, entry=plain_entry(b"v", time.time() + 60, b"s"))
            reply = await peer.Store(dht_pb2.StoreRequest(items=[item], dht_time=time.time() + 100))
            assert list(reply.stored) == [False]
            reply = await peer.Store(dht_pb2.StoreRequest(items=[item], dht_time=time.time()))
            assert list(reply.stored) == [True]
    finally:
        for node in (*honest, skewed):
            await node.stop()
