"""Bad input through real gRPC calls gets a clear status; the node keeps serving and
keeps what it stored."""

import math
import time

import grpc
import pytest
from helpers import run_async

from services.dht.client import DHTClient
from services.dht.config import NodeConfig
from services.dht.routing import id_to_bytes, key_to_id
from services.dht.server import start_node
from services.proto import dht_pb2, dht_pb2_grpc

CONFIG = NodeConfig(
    max_value_bytes=1024, max_key_bytes=64, max_records=3, max_keys_per_request=50,
    source_share=1.0, unowned_share=1.0,  # a full store, not the quotas (test_attacks_dht_round2)
)  # fmt: skip


async def expect(code: grpc.StatusCode, call, *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details(), err.value.details()


def put(key: bytes, **kwargs) -> dht_pb2.PutRequest:
    return dht_pb2.PutRequest(items=[dht_pb2.PutItem(key=key, entry=entry(**kwargs))])


def entry(value: bytes = b"v", expiration: float | None = None, subkey=None) -> dht_pb2.ValueEntry:
    message = dht_pb2.ValueEntry(value=value, expiration=expiration or time.time() + 60)
    if subkey is not None:
        message.subkey = subkey
    return message


@run_async
async def test_bad_input_gets_clear_status_and_node_survives() -> None:
    node = await start_node(CONFIG)
    try:
        async with grpc.aio.insecure_channel(node.address) as channel:
            peer = dht_pb2_grpc.DHTPeerStub(channel)
            dht = dht_pb2_grpc.DHTStub(channel)
            good_id = id_to_bytes(key_to_id(b"kept"))
            stored = await peer.Store(
                dht_pb2.StoreRequest(
                    items=[dht_pb2.StoreItem(key_id=good_id, entry=entry(b"kept"))]
                )
            )
            assert list(stored.stored) == [True]

            # wrong id lengths
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                peer.Find(dht_pb2.FindRequest(key_ids=[b"short"])),
                "key_ids[0]",
                "20 bytes",
            )
            bad_sender = dht_pb2.NodeInfo(node_id=b"x" * 21, address="127.0.0.1:1")
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                peer.Ping(dht_pb2.PingRequest(sender=bad_sender)),
                "sender.node_id",
            )
            no_port = dht_pb2.NodeInfo(node_id=b"x" * 20, address="nowhere")
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                peer.Find(dht_pb2.FindRequest(sender=no_port, key_ids=[good_id])),
                "host:port",
            )
            assert b"x" * 20 not in {id_to_bytes(i) for i in node.node.table.contacts()}
            # huge value (over the node's limit, and over the gRPC message limit)
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                peer.Store(
                    dht_pb2.StoreRequest(
                        items=[dht_pb2.StoreItem(key_id=good_id, entry=entry(b"x" * 5000))]
                    )
                ),
                "value is 5000 bytes",
            )
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                dht.Put(put(b"k", value=b"x" * 2000)),
                "limit 1024",
            )
            raw_put = channel.unary_unary("/dmoe.DHT/Put")
            await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, raw_put(b"\0" * (65 * 1024 * 1024)))
            # garbage bytes
            for method in ("/dmoe.DHTPeer/Store", "/dmoe.DHTPeer/Find", "/dmoe.DHT/Get"):
                raw = channel.unary_unary(method)
                await expect(
                    grpc.StatusCode.INVALID_ARGUMENT, raw(b"\xff\xfe garbage"), "malformed"
                )
            # unknown method, unknown fields, malformed arguments
            await expect(
                grpc.StatusCode.UNIMPLEMENTED, channel.unary_unary("/dmoe.DHTPeer/Delete")(b"")
            )
            unknown_field = dht_pb2.GetRequest(keys=[b"kept"]).SerializeToString() + b"\xf8\x3f\x01"
            reply = dht_pb2.GetResponse.FromString(
                await channel.unary_unary("/dmoe.DHT/Get")(unknown_field)
            )
            assert len(reply.results) == 1  # unknown fields are ignored, as protobuf intends
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                dht.Put(put(b"k", expiration=math.nan)),
                "finite",
            )
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                dht.Put(put(b"")),
                "empty key",
            )
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                dht.Get(dht_pb2.GetRequest(keys=[b"k" * 65])),
                "key is 65 bytes",
            )
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                dht.Get(dht_pb2.GetRequest(keys=[b"k"] * 51)),
                "51 keys",
            )
            await expect(
                grpc.StatusCode.INVALID_ARGUMENT,
                dht.Put(put(b"k", subkey=b"s" * 600)),
                "subkey",
            )
            # storage full: RESOURCE_EXHAUSTED, stored records kept
            assert len(node.node.storage) == 1
            items = [dht_pb2.PutItem(key=f"fill{i}".encode(), entry=entry()) for i in range(2)]
            reply = await dht.Put(dht_pb2.PutRequest(items=items))
            assert list(reply.stored) == [True, True]
            await expect(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                dht.Put(put(b"one.more")),
                "full",
            )
            with pytest.raises(ValueError, match="limit"):
                async with DHTClient([node.address]) as client:
                    await client.put([("k" * 100, None, b"v", time.time() + 10)])
            async with DHTClient([node.address]) as client:
                assert await client.put([("one.more", None, b"v", time.time() + 10)]) == [False]
                # still answering, nothing lost
                found = await client.get(["fill0", "fill1"])
                assert found["fill0"] is not None and found["fill1"] is not None
            reply = await peer.Find(dht_pb2.FindRequest(key_ids=[good_id]))
            assert reply.results[0].entries[0].value == b"kept"
            assert (await peer.Ping(dht_pb2.PingRequest())).peer.node_id == node.node.info.node_id
    finally:
        await node.stop(0)
