"""Owned records: forged, replayed, truncated and wrong-key entries are refused by the storing
node, dropped by the node merging a lookup, and dropped again by the reading client."""

import asyncio
import time

import grpc
import pytest
from helpers import run_async, until

from services.common.identity import Identity, parse_public_key
from services.dht.client import DHTClient
from services.dht.records import Entry, ownership_problem, record_message, sign_entry
from services.dht.routing import id_to_bytes, key_to_id
from services.dht.server import start_node
from services.dht.wire import entry_to_proto
from services.proto import dht_pb2, dht_pb2_grpc

OWNER, OTHER = Identity.generate(), Identity.generate()
KEY = id_to_bytes(key_to_id(b"ffn.3."))


def signed(value: bytes = b"10.0.0.5:1", expiration: float | None = None) -> Entry:
    return sign_entry(OWNER, KEY, b"14", value, expiration or time.time() + 60)


def test_every_field_is_signed_and_only_the_owner_can_sign() -> None:
    good = signed()
    assert ownership_problem(KEY, good, None) == ""
    for tampered in (
        good._replace(value=b"10.6.6.6:1"),
        good._replace(expiration=good.expiration + 1),
        good._replace(subkey=b"15"),
        good._replace(signature=good.signature[:-1] + bytes([good.signature[-1] ^ 1])),
        good._replace(signature=good.signature[:63]),  # truncated
        good._replace(
            signature=OTHER.sign(record_message(KEY, b"14", good.value, good.expiration))
        ),
    ):
        assert ownership_problem(KEY, tampered, None) == "bad_signature", tampered
    other_key = id_to_bytes(key_to_id(b"ffn.4."))
    assert ownership_problem(other_key, good, None) == "bad_signature"  # moved to another key
    assert ownership_problem(KEY, good._replace(owner=good.owner[:31]), None) == "bad_owner"
    assert ownership_problem(KEY, good._replace(subkey=None), None) == "owned_plain_value"
    assert ownership_problem(KEY, Entry(b"x", b"v", 1.0, b"", b"s" * 64), None)
    # a private swarm: only listed owners, never unowned entries
    assert ownership_problem(KEY, good, frozenset({OTHER.public_key})) == "untrusted"
    assert ownership_problem(KEY, good, frozenset({OWNER.public_key})) == ""
    assert ownership_problem(KEY, Entry(b"x", b"v", 1.0), frozenset({OWNER.public_key}))
    assert parse_public_key(OWNER.hex) == OWNER.public_key


@run_async
async def test_storing_node_refuses_bad_signatures_over_the_wire() -> None:
    node = await start_node()
    try:
        good = signed()
        bad = {
            "truncated": good._replace(signature=good.signature[:40]),
            "wrong key": good._replace(
                signature=OTHER.sign(record_message(KEY, b"14", good.value, good.expiration))
            ),
            "forged value": good._replace(value=b"10.6.6.6:1"),
        }
        async with grpc.aio.insecure_channel(node.address) as channel:
            dht, peer = dht_pb2_grpc.DHTStub(channel), dht_pb2_grpc.DHTPeerStub(channel)
            for what, entry in bad.items():
                put = dht_pb2.PutRequest(
                    items=[dht_pb2.PutItem(key=b"ffn.3.", entry=entry_to_proto(entry))]
                )
                store = dht_pb2.StoreRequest(
                    items=[dht_pb2.StoreItem(key_id=KEY, entry=entry_to_proto(entry))]
                )
                for call in (dht.Put(put), peer.Store(store)):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
                    assert "signature" in err.value.details(), what
                assert not node.node.storage.get(key_to_id(b"ffn.3."))
            ok = await dht.Put(
                dht_pb2.PutRequest(
                    items=[dht_pb2.PutItem(key=b"ffn.3.", entry=entry_to_proto(good))]
                )
            )
            assert list(ok.stored) == [True]
        assert node.node.rejections.count("bad_signature") == 2 * len(bad)
    finally:
        await node.stop()


@run_async
async def test_forged_answers_are_dropped_by_the_merging_node_and_by_the_client() -> None:
    """A hostile replica answers Find with a forged copy (later expiration, another address)
    of an owned entry: the node merging the lookup keeps the genuine one. A hostile DHT node
    answering Get directly: the client keeps only what verifies."""

    honest = await start_node()
    hostile = await start_node(initial_peers=[honest.address])
    try:
        await asyncio.wait_for(hostile.node.joined.wait(), 20)
        genuine = signed(expiration=time.time() + 60)
        async with DHTClient([honest.address], identity=OWNER) as client:
            assert await client.put([("ffn.3.", "14", genuine.value, genuine.expiration)],
                                    owned=True) == [True]  # fmt: skip
        # both nodes hold it (replicas of a two-node swarm)
        await until(lambda: hostile.node.storage.get(key_to_id(b"ffn.3.")), 60, "the copy")
        forged = entry_to_proto(genuine._replace(value=b"10.6.6.6:1", expiration=time.time() + 600))
        real_find = hostile.node.protocol.find

        async def find(request, caller_host):
            reply = await real_find(request, caller_host)
            for result in reply.results:
                del result.entries[:]
                result.entries.append(forged)
            return reply

        hostile.node.protocol.find = find
        entries = await honest.node.get_many([key_to_id(b"ffn.3.")], latest=True)
        assert [e.value for e in entries[0]] == [genuine.value]
        assert honest.node.rejections.count("bad_signature") >= 1

        # the hostile node's Get answers with the forgery, a truncated and an unsigned copy
        hostile.node.get_many = lambda key_ids, latest=False: _forged_get(genuine, key_ids)
        async with DHTClient([hostile.address]) as client:
            found = await client.get(["ffn.3."])
        assert [(e.value, e.owner) for e in found["ffn.3."][b"14"]] == [
            (genuine.value, OWNER.public_key)
        ]
        assert client.rejected["bad_signature"] == 2
    finally:
        await hostile.stop()
        await honest.stop()


async def _forged_get(genuine: Entry, key_ids: list[int]) -> list[list[Entry]]:
    later = genuine.expiration + 500
    return [
        [
            genuine,
            genuine._replace(value=b"10.6.6.6:1", expiration=later),  # forged
            genuine._replace(signature=genuine.signature[:63]),  # truncated
        ]
        for _ in key_ids
    ]
