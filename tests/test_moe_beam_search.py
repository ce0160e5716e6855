"""Beam search finds the same experts as an exhaustive search: in memory and through a real DHT."""

import asyncio
import itertools
import random
import time

import torch

from services.common.expert_keys import make_uid, parse_uid
from services.common.identity import Identity
from services.dht.client import DHTClient
from services.dht.server import start_node
from services.trainer.beam_search import beam_search
from services.trainer.gating import GridGating, expert_scores
from services.trainer.swarm import Swarm

GRID = (32, 32, 32)


def declarations(uids: list[str], address: str, expiration: float) -> list[tuple]:
    """The key scheme of docs/contracts.md: d+1 entries per expert."""
    items = []
    for uid in uids:
        parts = uid.split(".")
        items.append((uid, "", address.encode(), expiration))
        for t in range(1, len(parts)):
            items.append((".".join(parts[:t]) + ".", parts[t], address.encode(), expiration))
    return items


def in_memory_children(uids: list[str]):
    table: dict[str, dict[int, list[str]]] = {}
    for uid in uids:
        parts = uid.split(".")
        for t in range(1, len(parts)):
            table.setdefault(".".join(parts[:t]) + ".", {})[int(parts[t])] = [f"host:{uid}"]
    calls: list[list[str]] = []

    async def children(keys: list[str]) -> dict[str, dict[int, list[str]]]:
        calls.append(keys)
        return {k: table.get(k, {}) for k in keys}

    return children, calls


def exhaustive_top(grid_scores: list[torch.Tensor], uids: list[str], k: int) -> torch.Tensor:
    coords = torch.tensor([parse_uid("ffn.", uid) for uid in uids])
    total = sum(s[:, coords[:, d]] for d, s in enumerate(grid_scores))
    return total.topk(k, dim=1).values


def product_grid(seed: int) -> list[str]:
    rng = random.Random(seed)
    sets = [sorted(rng.sample(range(g), 10)) for g in GRID]
    return [make_uid("ffn.", c) for c in itertools.product(*sets)]


def test_beam_search_equals_exhaustive_in_memory() -> None:
    uids = product_grid(1)
    children, calls = in_memory_children(uids)
    torch.manual_seed(0)
    scores = [torch.randn(25, g) for g in GRID]
    found = asyncio.run(beam_search(scores, "ffn", 4, children))
    assert len(calls) == 3  # one batched lookup per grid dimension
    assert torch.allclose(found.scores, exhaustive_top(scores, uids, 4))
    for b in range(25):  # the uids match their coordinates and their scores
        for j, uid in enumerate(found.uids[b]):
            coords = parse_uid("ffn.", uid)
            assert coords == tuple(found.coords[b, j].tolist())
            assert (
                abs(
                    sum(float(scores[d][b, c]) for d, c in enumerate(coords))
                    - float(found.scores[b, j])
                )
                < 1e-5
            )
            assert found.addresses[uid] == f"host:{uid}"


def test_beam_search_on_sparse_grid_returns_live_experts_and_excludes() -> None:
    rng = random.Random(2)
    uids = sorted({make_uid("ffn.", [rng.randrange(8), rng.randrange(8)]) for _ in range(20)})
    children, _ = in_memory_children(uids)
    scores = [torch.randn(7, 8), torch.randn(7, 8)]
    banned = uids[0]
    found = asyncio.run(
        beam_search(scores, "ffn.", 3, children, beam_size=8, exclude=lambda uid, _a: uid == banned)
    )
    for row in found.uids:
        assert len(row) == 3 and set(row) <= set(uids) and banned not in row
    # beam as wide as the grid is exhaustive
    live = [u for u in uids if u != banned]
    assert torch.allclose(found.scores, exhaustive_top(scores, live, 3))


def test_beam_search_with_fewer_live_experts_than_k() -> None:
    children, _ = in_memory_children(["ffn.1.2", "ffn.3.0"])
    found = asyncio.run(beam_search([torch.randn(2, 4), torch.randn(2, 4)], "ffn", 4, children))
    assert found.valid.sum(1).tolist() == [2, 2]
    assert all(sorted(row) == ["ffn.1.2", "ffn.3.0"] for row in found.uids)
    assert bool((found.coords[~found.valid] == -1).all())
    empty, _ = in_memory_children([])
    for grid in ([4], [4, 3], [4, 3, 2]):
        none = asyncio.run(beam_search([torch.randn(3, g) for g in grid], "ffn", 2, empty))
        assert none.uids == [[], [], []] and not bool(none.valid.any())


def test_beam_search_through_real_dht_equals_exhaustive() -> None:
    """1,000 experts (3 dims of 10 inside a 32x32x32 grid), 25 random gating inputs."""
    uids = product_grid(3)

    async def start_and_declare():
        node = await start_node()
        async with DHTClient([node.address], identity=Identity.generate()) as client:
            items = declarations(uids, "127.0.0.1:1", time.time() + 300)
            for start in range(0, len(items), 1000):
                assert all(await client.put(items[start : start + 1000], owned=True))
        return node

    swarm = Swarm(None)
    try:
        node = swarm.run(start_and_declare())
        swarm.initial_peers = [node.address]
        torch.manual_seed(4)
        gating = GridGating(32, GRID)
        x = torch.randn(25, 32)
        grid_scores = gating(x)
        found = swarm.run(beam_search(grid_scores, "ffn.", 4, swarm.children))
        chosen = expert_scores(grid_scores, found.coords, found.valid)
        reference = exhaustive_top([s.detach() for s in grid_scores], uids, 4)
        assert torch.allclose(chosen.detach(), reference, atol=1e-5)
        assert all(len(row) == 4 for row in found.uids)
        assert set(found.addresses.values()) == {"127.0.0.1:1"}
        swarm.run(node.stop())
    finally:
        swarm.close()


def test_empty_prefixes_are_remembered_between_steps() -> None:
    """A sparse grid: ``ffn.`` says coordinates 0-3 are alive but only ``ffn.0.`` has experts
    (stale or bogus declarations above). Positive answers are not cached here (ttl 0), empty
    ones are, so the second search asks the DHT for ``ffn.`` and ``ffn.0.`` only."""
    uids = ["ffn.0.0", "ffn.0.1"]
    identity = Identity.generate()

    async def start_and_declare():
        node = await start_node()
        async with DHTClient([node.address], identity=identity) as client:
            items = declarations(uids, "127.0.0.1:1", time.time() + 300)
            items += [("ffn.", str(c), b"127.0.0.1:1", time.time() + 300) for c in (1, 2, 3)]
            assert all(await client.put(items, owned=True))
        return node

    swarm = Swarm(None, cache_ttl=0.0, negative_cache_ttl=60.0)
    try:
        node = swarm.run(start_and_declare())
        swarm.initial_peers = [node.address]
        asked: list[list[str]] = []
        client = swarm._dht_client()
        real_get = client.get

        async def get(keys, latest=False):
            asked.append(list(keys))
            return await real_get(keys, latest)

        client.get = get
        scores = [torch.randn(8, 4), torch.randn(8, 4)]
        first = swarm.run(beam_search(scores, "ffn.", 2, swarm.children, beam_size=4))
        assert {u for row in first.uids for u in row} <= set(uids)
        assert sorted(k for keys in asked for k in keys) == sorted(
            ["ffn.", "ffn.0.", "ffn.1.", "ffn.2.", "ffn.3."]
        )
        asked.clear()
        swarm.run(beam_search(scores, "ffn.", 2, swarm.children, beam_size=4))
        assert sorted(k for keys in asked for k in keys) == ["ffn.", "ffn.0."]
        swarm.run(node.stop())
    finally:
        swarm.close()
