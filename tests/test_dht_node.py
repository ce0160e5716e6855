"""Node logic over the in-process transport (the code path of benchmark mode B)."""

import asyncio
import hashlib
import random
import time

from helpers import run_async, until

from services.dht.config import NodeConfig
from services.dht.metrics import NullMetrics
from services.dht.node import DHTNode
from services.dht.routing import ID_BITS, key_to_id, nearest_of
from services.dht.storage import Entry
from services.dht.transport import InProcessTransport


def make_node(transport: InProcessTransport, i: int, config: NodeConfig, **kw) -> DHTNode:
    address = f"10.0.{i // 256}.{i % 256}:31330"
    node = DHTNode(transport, config, address=address, **kw)
    transport.register(address, node.protocol)
    return node


async def introduce(node: DHTNode, *peers: DHTNode) -> None:
    """``node`` learns ``peers`` the way the protocol lets it: each proves its id (signed ping)."""
    for peer in peers:
        assert await node.ping(peer.address) is not None


async def settle(nodes: list[DHTNode]) -> None:
    """Wait until no node is still verifying a peer (background pings back)."""
    await until(lambda: not any(n._verifying for n in nodes), 60, "verifications", every=0.01)


async def quiesce(nodes: list[DHTNode]) -> None:
    """Wait until no node has background work left (verifications, hand-offs, evictions)."""
    await until(lambda: not any(n._tasks for n in nodes), 60, "background tasks", every=0.01)


def far_half(me: DHTNode, transport: InProcessTransport, config: NodeConfig, count: int):
    """Nodes whose ids differ from ``me``'s in the top bit (ids are hashes of keys, so keep
    drawing keys until enough land there)."""
    top = me.node_id >> (ID_BITS - 1)
    found, i = [], 1
    while len(found) < count:
        node = make_node(transport, i, config)
        if node.node_id >> (ID_BITS - 1) != top:
            found.append(node)
        else:
            transport.unregister(node.address)
        i += 1
    return found


@run_async
async def test_full_bucket_pings_least_recently_seen_before_evicting() -> None:
    transport = InProcessTransport()
    # classic Kademlia: only the own bucket splits; a ban that outlasts the test (the default
    # 1 s one could end on a loaded machine before it is checked)
    config = NodeConfig(k=2, depth_modulo=1, blacklist_base=60.0)
    me = make_node(transport, 0, config)
    a, b, c, d = far_half(me, transport, config, 4)
    for peer in (a, b):  # each pings back to check our id, which refreshes it: wait for that
        await introduce(me, peer)
        await settle([me, peer])
    await introduce(me, c)  # bucket full: ping a (least recently seen)
    assert me.table.bucket_for(a.node_id).pinging
    await until(lambda: not me.table.bucket_for(a.node_id).pinging, 20, "the ping of a")
    await settle([me, a, b, c, d])
    assert a.node_id in me.table and c.node_id not in me.table  # a answered: it stays
    transport.unregister(b.address)  # b dies
    await introduce(me, d)  # full again: ping b, which fails
    await until(lambda: b.node_id not in me.table, 20, "b evicted")
    await settle([me, d])
    assert d.node_id in me.table
    assert me.blacklist.blocked(b.address)
    me.on_contact(b.node_id, b.address)  # b calls us again: unbanned
    assert not me.blacklist.blocked(b.address)
    for node in (me, a, b, c, d):
        await node.stop()


@run_async
async def test_inprocess_swarm_store_get_after_churn() -> None:
    rng = random.Random(3)
    transport = InProcessTransport()
    config = NodeConfig(maintenance_interval=0.2)
    nodes: list[DHTNode] = []
    for i in range(64):
        node = make_node(transport, i, config)
        await node.start([n.address for n in rng.sample(nodes, min(4, len(nodes)))])
        await asyncio.wait_for(node.joined.wait(), 60)  # bounds a hang only
        nodes.append(node)
    keys = [key_to_id(f"k{i}".encode()) for i in range(40)]
    expiration = time.time() + 60
    counts, full = await nodes[5].store_many(
        [(k, Entry(None, b"v%d" % i, expiration)) for i, k in enumerate(keys)]
    )
    assert counts == [5] * len(keys) and not full
    ids = [n.node_id for n in nodes]
    for k in keys:
        assert {n.node_id for n in nodes if n.storage.get(k)} == set(nearest_of(k, ids, 5))
    for victim in rng.sample(nodes[1:], 6):
        transport.unregister(victim.address)
        await victim.stop()
        nodes.remove(victim)
    for node in rng.sample(nodes, 10):
        found = await node.get_many(keys)
        assert [[e.value for e in f] for f in found] == [[b"v%d" % i] for i in range(40)]
    for node in nodes:
        await node.stop()


@run_async
async def test_concurrent_requests_to_one_peer_share_an_rpc() -> None:
    transport = InProcessTransport()
    config = NodeConfig(blacklist_base=60.0)  # the ban still holds when checked, under load
    a, b, c = (make_node(transport, i, config) for i in (1, 2, 3))
    await introduce(a, b)
    await introduce(b, c)
    await settle([a, b, c])
    targets = [key_to_id(f"t{i}".encode()) for i in range(6)]
    before = transport.calls
    # six lookups started in the same loop turn ask b once, in one Find carrying six keys
    answers = await asyncio.gather(
        *(a.find(b.node_id, b.address, [t], nodes_only=True) for t in targets)
    )
    assert transport.calls - before == 1
    assert all(answer == [([], [(c.node_id, c.address)])] for answer in answers)
    # an error reaches every request of the batch, and the dead peer is blacklisted
    transport.unregister(b.address)
    results = await asyncio.gather(
        *(a.find(b.node_id, b.address, [t], nodes_only=True) for t in targets),
        return_exceptions=True,
    )
    assert all(isinstance(r, Exception) and "UNAVAILABLE" in str(r) for r in results)
    assert a.blacklist.blocked(b.address) and b.node_id not in a.table
    for node in (a, b, c):
        await node.stop()


@run_async
async def test_loopback_announce_is_replaced_by_the_observed_host() -> None:
    from services.dht.validation import caller_host
    from services.proto import dht_pb2

    transport = InProcessTransport()
    node = make_node(transport, 1, NodeConfig())
    other = make_node(transport, 2, NodeConfig())
    for address in ("10.1.2.3:4000", "dht-2:4000"):  # where `other` really answers
        transport.register(address, other.protocol)
    sender = dht_pb2.NodeInfo(node_id=other.info.node_id, address="127.0.0.1:4000")
    await node.protocol.handle("Ping", dht_pb2.PingRequest(sender=sender), caller_host="10.1.2.3")
    await settle([node, other])
    # the address checked (and so the one the table may hold) is the observed host's
    assert node.verified.get("10.1.2.3:4000") == other.node_id  # loopback announce fixed
    assert "127.0.0.1:4000" not in node.verified
    sender.address = "dht-2:4000"
    await node.protocol.handle("Ping", dht_pb2.PingRequest(sender=sender), caller_host="10.1.2.3")
    await settle([node, other])
    assert node.verified.get("dht-2:4000") == other.node_id  # a real name is kept
    assert caller_host("ipv4:172.18.0.3:45678") == "172.18.0.3"
    assert caller_host("ipv6:%5B::1%5D:5678") == "::1"
    assert caller_host("unix:/tmp/sock") == ""


class Recorder(NullMetrics):
    def __init__(self) -> None:
        self.lookups: list[str] = []

    def lookup(self, operation: str, rounds: int, rpcs: int) -> None:
        self.lookups.append(operation)


@run_async
async def test_maintenance_republishes_and_refreshes() -> None:
    rng = random.Random(9)
    transport = InProcessTransport()
    config = NodeConfig(maintenance_interval=0.05, republish_interval=0.4, refresh_interval=0.3)
    recorder = Recorder()
    nodes: list[DHTNode] = []
    for i in range(20):
        node = make_node(transport, i, config, metrics=recorder)
        await node.start([n.address for n in rng.sample(nodes, min(3, len(nodes)))])
        await asyncio.wait_for(node.joined.wait(), 60)  # bounds a hang only
        nodes.append(node)
    key = key_to_id(b"kept alive")
    counts, _ = await nodes[0].store_many([(key, Entry(None, b"v", time.time() + 60))])
    assert counts == [5]
    replicas = [n for n in nodes if n.storage.get(key)]
    for dead in replicas[:3]:
        transport.unregister(dead.address)
        await dead.stop()
        nodes.remove(dead)
    # the maintenance loop republishes to the nearest live nodes and refreshes buckets
    live = set(nearest_of(key, [n.node_id for n in nodes], 5))
    await until(lambda: {n.node_id for n in nodes if n.storage.get(key)} == live, 60, "republished")
    await until(lambda: "refresh" in recorder.lookups, 60, "a bucket refresh")
    for node in nodes:
        await node.stop()


def test_blacklist_backoff_doubles_and_clears() -> None:
    from services.dht.blacklist import Blacklist

    now = [100.0]
    blacklist = Blacklist(base=0.05, maximum=0.1, clock=lambda: now[0])
    blacklist.fail("a:1")
    assert blacklist.blocked("a:1") and len(blacklist) == 1
    now[0] += 0.06
    assert not blacklist.blocked("a:1")
    blacklist.fail("a:1")  # second failure: 0.1 s
    now[0] += 0.06
    assert blacklist.blocked("a:1")
    now[0] += 0.05
    assert not blacklist.blocked("a:1")
    blacklist.fail("a:1")  # capped at the maximum
    assert blacklist.blocked("a:1")
    blacklist.clear("a:1")
    assert not blacklist.blocked("a:1") and len(blacklist) == 0


@run_async
async def test_store_doubles_as_last_lookup_step_and_non_replicas_decline() -> None:
    from services.proto import dht_pb2

    transport = InProcessTransport()
    config = NodeConfig()
    key = key_to_id(b"conditional")
    # ids are hashes of keys: rank ten nodes by distance to the key instead of placing them
    nodes = sorted(
        (make_node(transport, i, config) for i in range(10)), key=lambda n: n.node_id ^ key
    )
    near, far, storer = nodes[:6], nodes[6:9], nodes[9]
    for node in far:  # they know the 5 nearest: not replicas themselves
        await introduce(node, *near[:5])
    await introduce(near[0], *near[1:])
    await introduce(storer, near[0], near[5], *far)  # the storer misses n2..n5
    await settle(nodes)

    # the wire rule: a conditional store is declined by a node that knows 5 nearer peers
    item = dht_pb2.StoreItem(
        key_id=key.to_bytes(20, "big"),
        entry=dht_pb2.ValueEntry(value=b"v", expiration=time.time() + 60),
    )
    reply = await far[0].protocol.handle(
        "Store", dht_pb2.StoreRequest(sender=storer.info, items=[item], replicas=5)
    )
    assert list(reply.stored) == [False] and list(reply.declined) == [True]
    named = {int.from_bytes(p.node_id, "big") for p in reply.nearest[0].nearest}
    assert named == {n.node_id for n in near[:5]}
    assert not far[0].storage.get(key)
    reply = await near[0].protocol.handle(
        "Store", dht_pb2.StoreRequest(sender=storer.info, items=[item], replicas=5)
    )
    assert list(reply.stored) == [True] and list(reply.declined) == [False]

    # the storer's table misses 4 of the 5 nearest: the store finds and fills them anyway;
    # n6 knew no nearer node, so it stored in the first step, then was told to demote its
    # copy to a cached one: exactly 5 replicas
    entry = Entry(None, b"value", time.time() + 60)
    counts, full = await storer.store_many([(key, entry)])
    assert counts == [5] and not full
    holders = {n.node_id for n in (*near, *far, storer) if n.storage.get(key)}
    assert holders == {n.node_id for n in near[:5]}
    assert near[5].cache.get(key) == [entry] and not far[0].cache.get(key)
    for node in (*near, *far, storer):
        await node.stop()


async def _latest_rounds(k: int) -> tuple[int, int, int]:
    """A latest get's (rounds, Find requests, subkeys seen) in a 9-node swarm where every
    node knows every other."""
    transport = InProcessTransport()
    config = NodeConfig(k=k)
    nodes = [make_node(transport, i, config) for i in range(9)]
    for node in nodes:
        await introduce(node, *(peer for peer in nodes if peer is not node))
    await settle(nodes)
    key = key_to_id(b"latest")
    reader = next(
        n for n in nodes if n.node_id not in nearest_of(key, [x.node_id for x in nodes], 5)
    )
    for i, writer in enumerate(nodes[:3]):
        await writer.store_many([(key, Entry(f"s{i}".encode(), b"v", time.time() + 60))])
    (state,) = await reader.lookup([key], "get", values=True, latest=True, beam=5)
    seen = {e.subkey for e in state.entries}
    for node in nodes:
        await node.stop()
    return state.rounds, state.rpcs, len(seen)


def test_latest_get_in_a_small_swarm_asks_the_whole_beam_at_once() -> None:
    # fewer contacts than k: the table holds the replica set, one round of 5 Finds
    assert asyncio.run(_latest_rounds(k=20)) == (1, 5, 3)
    # a full table (k=4 < 8 contacts): alpha=3 per round, the same 5 Finds in two rounds
    assert asyncio.run(_latest_rounds(k=4)) == (2, 5, 3)


async def _hand_off(enabled: bool) -> tuple[bool, int]:
    """A value stored in a 20-node swarm; then 10 nodes join whose ids are all nearer its key
    than any old node; a fresh node's plain get. Returns (found, newcomers holding it)."""
    from services.common.identity import Identity
    from services.dht import node as node_module

    rng = random.Random(5)
    transport = InProcessTransport()
    config = NodeConfig(republish_interval=3600, refresh_interval=3600)
    nodes: list[DHTNode] = []
    for i in range(20):
        node = make_node(transport, i, config)
        await node.start([n.address for n in rng.sample(nodes, min(3, len(nodes)))])
        await asyncio.wait_for(node.joined.wait(), 60)  # bounds a hang only
        nodes.append(node)
    # ids are hashes of keys: draw keys, and pick a key whose 10 nearest drawn ids are all
    # nearer it than every node of the swarm
    pool = [Identity.generate() for _ in range(3000)]
    ids = {id(i): int.from_bytes(hashlib.sha1(i.public_key).digest(), "big") for i in pool}
    for attempt in range(100):
        key = key_to_id(b"handed off %d" % attempt)
        identities = sorted(pool, key=lambda i: key ^ ids[id(i)])[:10]
        if max(key ^ ids[id(i)] for i in identities) < min(key ^ n.node_id for n in nodes):
            break
    counts, _ = await nodes[3].store_many([(key, Entry(b"s", b"v", time.time() + 600))])
    assert counts == [5]
    if not enabled:  # what a node did before hand-off existed
        original = node_module.hand_off
        node_module.hand_off = lambda *args: asyncio.sleep(0)
    try:
        newcomers = []
        for j, identity in enumerate(identities):
            node = make_node(transport, 100 + j, config, identity=identity)
            await node.start([nodes[j].address])
            await asyncio.wait_for(node.joined.wait(), 60)  # bounds a hang only
            newcomers.append(node)
        assert max(key ^ n.node_id for n in newcomers) < min(key ^ n.node_id for n in nodes)
        await quiesce([*nodes, *newcomers])  # hand-offs run in the background
        reader = make_node(transport, 200, config)
        await reader.start([nodes[0].address])
        await asyncio.wait_for(reader.joined.wait(), 5)
        (found,) = await reader.get_many([key])
        holders = sum(1 for n in newcomers if n.storage.get(key))
    finally:
        if not enabled:
            node_module.hand_off = original
    for node in (*nodes, *newcomers, reader):
        await node.stop()
    return [e.value for e in found] == [b"v"], holders


def test_new_nodes_nearer_a_key_get_its_records_at_once() -> None:
    found, holders = asyncio.run(_hand_off(enabled=True))
    assert found and holders >= 5
    # the same swarm without hand-off: no newcomer holds it (a plain get then misses it
    # whenever its lookup does not happen to pass an old replica)
    _, holders = asyncio.run(_hand_off(enabled=False))
    assert holders == 0
