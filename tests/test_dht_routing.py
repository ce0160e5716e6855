"""Routing table: k-bucket rules and nearest-neighbour queries against brute force."""

import random

from services.dht.routing import (
    ID_BITS,
    ID_SPACE,
    RoutingTable,
    id_from_bytes,
    id_to_bytes,
    key_to_id,
    nearest_of,
)


def _address(i: int) -> str:
    return f"10.0.{i // 256 % 256}.{i % 256}:{1000 + i // 65536}"


def test_nearest_matches_brute_force_for_10000_random_ids() -> None:
    rng = random.Random(1)
    own = rng.getrandbits(ID_BITS)
    table = RoutingTable(own, k=20, depth_modulo=5)
    ids = [rng.getrandbits(ID_BITS) for _ in range(10_000)]
    for i, node_id in enumerate(ids):
        table.add_or_update(node_id, _address(i))
    held = table.contacts()
    assert 100 < len(held) < 10_000  # far buckets are full, so not everyone fits
    # buckets tile the id space, hold at most k, and every held id is in its bucket
    assert table.buckets[0].lower == 0 and table.buckets[-1].upper == ID_SPACE
    for left, right in zip(table.buckets, table.buckets[1:], strict=False):
        assert left.upper == right.lower
    assert all(len(b.nodes) <= 20 for b in table.buckets)
    assert all(b.covers(i) for b in table.buckets for i in b.nodes)
    targets = [rng.getrandbits(ID_BITS) for _ in range(300)] + rng.sample(ids, 100)
    for target in targets:
        expected = nearest_of(target, held, 20)
        assert [i for i, _ in table.nearest(target, 20)] == expected
    # the contacts nearest our own id are all kept (the own-id bucket always splits)
    assert nearest_of(own, held, 20) == nearest_of(own, ids, 20)


def test_split_rule_depth_modulo() -> None:
    own = 0  # own id in the lowest bucket: buckets covering the top half hold far ids
    table = RoutingTable(own, k=2, depth_modulo=2)
    top = ID_SPACE // 2
    # depth-1 bucket [top, ID_SPACE): 1 % 2 != 0, so it may split once although far away
    for node_id in (top, top + 1, ID_SPACE - 1):
        assert table.add_or_update(node_id, f"h:{node_id % 60000 + 1}") is None
    depths = sorted(b.depth for b in table.buckets if b.lower >= top)
    assert depths == [2, 2]
    # now the [top, 3/4) bucket (depth 2, even, not ours) is full and may not split
    assert len(table.bucket_for(top).nodes) == 2
    oldest = table.add_or_update(top + 2, "h:9")
    assert oldest == (top, table.address_of(top))  # least-recently-seen: ping it
    assert top + 2 not in table and top + 2 in table.bucket_for(top).replacements
    # the ping failed: the replacement moves in
    assert table.remove(top)
    assert top + 2 in table and top not in table


def test_seen_again_moves_to_tail_and_same_address_new_id_replaces() -> None:
    table = RoutingTable(0, k=3, depth_modulo=5)
    far = ID_SPACE // 2
    for i in range(3):
        table.add_or_update(far + i, f"h:{i + 1}")
    table.add_or_update(far, "h:1")  # refreshed: now most recently seen
    assert table.add_or_update(far + 9, "h:9") == (far + 1, "h:2")
    table.add_or_update(far + 50, "h:3")  # the peer at h:3 restarted with a new id
    assert far + 2 not in table and table.address_of(far + 50) == "h:3"
    assert table.add_or_update(0, "self:1") is None and 0 not in table


def test_ids_are_20_bytes_and_keys_hash_with_sha1() -> None:
    import hashlib

    assert key_to_id(b"ffn.3.") == int.from_bytes(hashlib.sha1(b"ffn.3.").digest(), "big")
    assert id_from_bytes(id_to_bytes(12345)) == 12345
    for bad in (b"", b"x" * 19, b"x" * 21):
        try:
            id_from_bytes(bad)
        except ValueError as exc:
            assert "20 bytes" in str(exc)
        else:
            raise AssertionError("accepted a bad id")
