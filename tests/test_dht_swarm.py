"""A 50-node swarm of real gRPC nodes on 127.0.0.1 (one process): lookups, store/get,
replication, expirations."""

import asyncio
import random
import time

from helpers import make_swarm, run_async

from services.dht.client import DHTClient, ValueWithExpiration
from services.dht.config import NodeConfig
from services.dht.routing import key_to_id, nearest_of
from services.dht.server import RunningNode


async def stop_all(nodes: list[RunningNode]) -> None:
    await asyncio.gather(*(x.stop(0) for x in nodes))


def holders(nodes: list[RunningNode], key: bytes) -> set[int]:
    return {x.node.node_id for x in nodes if x.node.storage.get(key_to_id(key))}


@run_async
async def test_50_node_swarm_lookups_store_get_replicas_expiry() -> None:
    rng = random.Random(7)
    # 50 nodes share one process: a generous deadline keeps a loaded CI machine from
    # blacklisting live peers, which this test (routing, not failure handling) must not see
    nodes = await make_swarm(50, rng, NodeConfig(rpc_timeout=5.0))
    try:
        ids = [x.node.node_id for x in nodes]
        # lookups of existing node ids hit exactly
        for target in ids:
            asker = rng.choice(nodes).node
            (state,) = await asker.lookup([target], "test", values=False)
            assert state.nearest_answered(1)[0][0] == target
        # random targets: top-1 equals brute force in >= 90%
        hits, trials = 0, 100
        for _ in range(trials):
            target = rng.getrandbits(160)
            (state,) = await rng.choice(nodes).node.lookup([target], "test", values=False)
            hits += state.nearest_answered(1)[0][0] == nearest_of(target, ids, 1)[0]
        assert hits >= 0.9 * trials, hits

        # store/get from any node, with expirations
        now = time.time()
        items = [(f"plain.{i}", None, f"value-{i}".encode(), now + 60 + i) for i in range(10)]
        items += [("dict.", f"{i}", f"sub-{i}".encode(), now + 30 + i) for i in range(5)]
        async with DHTClient([rng.choice(nodes).address]) as client:
            assert await client.put(items) == [True] * len(items)
        for _ in range(5):
            async with DHTClient([rng.choice(nodes).address]) as client:
                found = await client.get([k for k, *_ in items[:10]] + ["dict.", "missing"])
            for key, _, value, expiration in items[:10]:
                assert found[key] == ValueWithExpiration(value, expiration)
            assert found["dict."] == {
                s.encode(): [ValueWithExpiration(v, e)] for _, s, v, e in items[10:]
            }
            assert found["missing"] is None

        # exactly num_replicas copies, on the 5 nodes nearest the key
        reply_counts = []
        for key, *_ in items[:10]:
            held = holders(nodes, key.encode())
            assert len(held) == 5, (key, len(held))
            assert held == set(nearest_of(key_to_id(key.encode()), ids, 5))
            reply_counts.append(len(held))
        async with DHTClient([nodes[3].address]) as client:
            from services.proto import dht_pb2

            reply = await client._call(
                "Put",
                dht_pb2.PutRequest(
                    items=[
                        dht_pb2.PutItem(
                            key=b"counted",
                            entry=dht_pb2.ValueEntry(value=b"x", expiration=time.time() + 60),
                        )
                    ]
                ),
            )
            assert list(reply.replicas) == [5] and len(holders(nodes, b"counted")) == 5

            # a store with an older expiration is refused, the newer value stays
            assert await client.put([("plain.0", None, b"older", now + 10)]) == [False]
            assert (await client.get(["plain.0"], latest=True))["plain.0"].value == b"value-0"
            # subkeys keep separate expirations; expired values are gone. The short entries
            # live `life` s; when a loaded machine answers only after they expired, what it
            # read proves nothing: again on fresh keys with a longer life.
            life = 1.5
            for attempt in range(4):
                sub, plain = f"sub{attempt}.", f"short{attempt}.plain"
                soon = time.time() + life
                stored = await client.put(
                    [
                        (sub, "long", b"L", time.time() + 60),
                        (sub, "short", b"S", soon),
                        (plain, None, b"P", soon),
                    ]
                )
                both = await client.get([sub, plain], latest=True)
                renewed = await client.put([(sub, "long", b"L2", time.time() + 90)])
                found = await client.get([sub], latest=True)
                if time.time() < soon:  # every answer came before the short entries expired
                    break
                life *= 4
            else:
                raise AssertionError("the machine never answered within the short entries' life")
            assert stored == [True, True, True] and renewed == [True]
            assert set(both[sub]) == {b"long", b"short"} and both[plain].value == b"P"
            assert [e.value for e in found[sub][b"short"]] == [b"S"]
            assert [e.value for e in found[sub][b"long"]] == [b"L2"]
            await asyncio.sleep(max(0.0, soon - time.time()) + 0.3)
            async with DHTClient([rng.choice(nodes).address]) as other:
                found = await other.get([sub, plain], latest=True)
            assert set(found[sub]) == {b"long"}
            assert found[plain] is None
            for x in nodes:
                x.node.storage.purge()
            assert not holders(nodes, plain.encode())
    finally:
        await stop_all(nodes)
