"""Churn over real gRPC: nodes die, the bootstrap node restarts, nodes start before their
bootstrap peer, replicas are republished."""

import asyncio
import random
import time

from grpc_health.v1 import health_pb2
from helpers import free_port, make_swarm, run_async, until

from services.dht.client import DHTClient
from services.dht.config import NodeConfig
from services.dht.replication import republish
from services.dht.routing import key_to_id, nearest_of
from services.dht.server import RunningNode, start_node


async def health(node: RunningNode) -> int:
    reply = await node.server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    return reply.status


# 50 nodes share this test's event loop: at load 25 on two cores a Put (a store lookup among
# them) took longer than the client's default 5 s, so clients here wait longer.
CLIENT_TIMEOUT = 60.0


@run_async
async def test_churn_kill_10_percent_and_restart_bootstrap() -> None:
    rng = random.Random(11)
    nodes = await make_swarm(50, rng, NodeConfig(seed_ping_interval=0.5))
    alive = list(nodes)
    try:
        now = time.time()
        values = {f"churn.{i}": f"v{i}".encode() for i in range(30)}
        for key, value in values.items():
            async with DHTClient([rng.choice(nodes).address], timeout=CLIENT_TIMEOUT) as client:
                assert await client.put([(key, None, value, now + 120)]) == [True]
        # kill 10% (never the bootstrap node 0, restarted below)
        victims = rng.sample(nodes[1:], 5)
        await asyncio.gather(*(v.stop(0) for v in victims))
        alive = [x for x in nodes if x not in victims]
        # who holds a victim as a contact now: noticing a dead peer drops it from the table,
        # and nothing puts it back (only a peer that answers re-enters)
        held = [
            (x, v.node.node_id) for x in alive for v in victims if v.node.node_id in x.node.table
        ]
        assert held
        keys = list(values)
        for survivor in alive:
            found = await survivor.node.get_many([key_to_id(k.encode()) for k in keys])
            for key, entries in zip(keys, found, strict=True):
                assert [e.value for e in entries] == [values[key]], (survivor.address, key)
        # the dead were noticed: dropped from tables (their blacklist bans last only 1 s, so
        # counting bans in force raced a loaded machine)
        assert any(v not in x.node.table for x, v in held)

        # restart the bootstrap node on the same port: new nodes still join through it
        boot = nodes[0]
        port = boot.server.port
        await boot.stop(0)
        alive.remove(boot)
        restarted = await start_node(port=port)
        alive.append(restarted)
        assert restarted.address == boot.address
        # nodes that bootstrapped through it ping it again and it learns the swarm
        await until(lambda: len(restarted.node.table) >= 3, 60, "the restarted node relearns peers")
        newcomers = [await start_node(initial_peers=[restarted.address]) for _ in range(3)]
        alive.extend(newcomers)
        await asyncio.wait_for(asyncio.gather(*(x.node.joined.wait() for x in newcomers)), 30)
        for newcomer in newcomers:
            assert len(newcomer.node.table) >= 10
            async with DHTClient([newcomer.address], timeout=CLIENT_TIMEOUT) as client:
                found = await client.get(keys)
            assert all(found[k] is not None and found[k].value == v for k, v in values.items())
    finally:
        await asyncio.gather(*(x.stop(0) for x in alive))


@run_async
async def test_node_started_before_its_bootstrap_peer_joins_when_it_appears() -> None:
    port = free_port()
    # the initial peer is a DNS name that only starts answering later
    early = await start_node(initial_peers=[f"localhost:{port}"])
    late = None
    try:
        await asyncio.sleep(1.0)
        assert not early.node.joined.is_set()
        assert await health(early) == health_pb2.HealthCheckResponse.NOT_SERVING
        late = await start_node(port=port)
        await asyncio.wait_for(early.node.joined.wait(), 20)
        serving = health_pb2.HealthCheckResponse.SERVING

        async def is_serving() -> bool:
            return await health(early) == serving

        await until(is_serving, 20, "early serving", every=0.05)
        # each adds the other once a background ping has verified it
        await until(lambda: late.node.node_id in early.node.table, 20, "late in early's table")
        await until(lambda: early.node.node_id in late.node.table, 20, "early in late's table")
        async with DHTClient([early.address]) as client:
            assert await client.put([("late.key", None, b"x", time.time() + 30)]) == [True]
        async with DHTClient([late.address]) as client:
            assert (await client.get(["late.key"]))["late.key"].value == b"x"
    finally:
        await early.stop(0)
        if late is not None:
            await late.stop(0)


@run_async
async def test_republish_restores_num_replicas_after_replicas_die() -> None:
    rng = random.Random(5)
    # A roomy deadline: this checks where republish puts the copies, not failure handling
    # (the churn test above keeps the 1.5 s default); a live peer that misses a deadline on a
    # loaded machine is blacklisted and skipped. Stopped nodes refuse at once either way.
    nodes = await make_swarm(12, rng, NodeConfig(rpc_timeout=5.0))
    alive = list(nodes)
    try:
        key = b"republished"
        async with DHTClient([nodes[0].address]) as client:
            assert await client.put([(key, None, b"v", time.time() + 60)]) == [True]
        target = key_to_id(key)
        replicas = [x for x in nodes if x.node.storage.get(target)]
        assert len(replicas) == 5
        dead = replicas[:3]
        await asyncio.gather(*(x.stop(0) for x in dead))
        alive = [x for x in nodes if x not in dead]
        sent = await republish(replicas[3].node, force=True)
        assert sent == 1
        live_ids = [x.node.node_id for x in alive]
        now_held = {x.node.node_id for x in alive if x.node.storage.get(target)}
        assert now_held == set(nearest_of(target, live_ids, 5))
        # a replica stored just now skips its own republish (somebody else did it)
        assert await republish(replicas[4].node) == 0
    finally:
        await asyncio.gather(*(x.stop(0) for x in alive))


async def _state_file_scenario(path) -> None:
    seed = await start_node(state_file=path)
    others = [await start_node(initial_peers=[seed.address]) for _ in range(3)]
    try:
        await asyncio.wait_for(asyncio.gather(*(x.node.joined.wait() for x in others)), 30)
        async with DHTClient([others[0].address]) as client:
            assert await client.put([("kept", "s", b"v", time.time() + 120)]) == [True]
        await until(lambda: len(seed.node.table) >= 3, 60, "the seed knows the others")
        await seed.stop(0)  # writes the state file
        # the seed comes back on another port, with no initial peers: it rejoins from its file
        again = await start_node(state_file=path)
        await until(
            lambda: {x.node.node_id for x in others} <= set(again.node.table.contacts()),
            60,
            "the seed back in touch with the others",
        )
        (found,) = await again.node.get_many([key_to_id(b"kept")])
        assert [e.value for e in found] == [b"v"]
        await again.stop(0)
    finally:
        for x in others:
            await x.stop(0)


@run_async
async def test_restarted_seed_rejoins_from_its_state_file(tmp_path) -> None:
    await _state_file_scenario(tmp_path / "dht.state")
    assert (tmp_path / "dht.state").exists()
