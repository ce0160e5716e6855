"""One error path: a handler that raises ``StatusError`` answers exactly its code and message,
over a unary call and over a peer link alike; any other exception is INTERNAL with its
traceback logged. A tiny servicer started through the common bootstrap, real gRPC."""

import logging

import grpc
import pytest
from helpers import run_async

from services.common.errors import CallError, StatusError
from services.common.link import LinkPool, LinkServer
from services.common.server import start_server
from services.proto.link_pb2 import LinkBatch

SERVICE = "test.Errors"
REFUSAL = "no such thing: b'x' (3 things here)"


async def refuse(payload: bytes, peer: str) -> bytes:
    raise StatusError(grpc.StatusCode.NOT_FOUND, f"no such thing: {payload!r} (3 things here)")


async def broken(payload: bytes, peer: str) -> bytes:
    raise RuntimeError("a bug")


async def ok(payload: bytes, peer: str) -> bytes:
    return payload.upper()


METHODS = {"Refuse": refuse, "Broken": broken, "Ok": ok}


def register_with(link: LinkServer):
    def unary(method):
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await method(request, context.peer())  # no abort: the guard answers

        return grpc.unary_unary_rpc_method_handler(handle)

    def register(server: grpc.aio.Server) -> list[str]:
        handlers = {name: unary(method) for name, method in METHODS.items()}
        handlers["Link"] = grpc.stream_stream_rpc_method_handler(
            link.serve,
            request_deserializer=LinkBatch.FromString,
            response_serializer=LinkBatch.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        return [SERVICE]

    return register


async def unary_status(channel: grpc.aio.Channel, method: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await channel.unary_unary(f"/{SERVICE}/{method}")(b"x", timeout=10)
    return err.value.code(), err.value.details()


async def link_status(links: LinkPool, address: str, method: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(CallError) as err:
        await links.call(address, method, b"x", 10)
    return err.value.code, err.value.message


@run_async
async def test_status_error_is_its_status_over_unary_and_link(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    link = LinkServer(METHODS)
    server = await start_server("test", register_with(link), metrics_port=None, links=[link])
    address = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(address)

    def open_call(target: str):
        return channel.stream_stream(
            f"/{SERVICE}/Link",
            request_serializer=LinkBatch.SerializeToString,
            response_deserializer=LinkBatch.FromString,
        )()

    links = LinkPool(open_call, lambda target: None)
    try:
        refused = (grpc.StatusCode.NOT_FOUND, REFUSAL)
        assert await unary_status(channel, "Refuse") == refused
        assert await link_status(links, address, "Refuse") == refused
        bug = (grpc.StatusCode.INTERNAL, "RuntimeError: a bug")
        assert await unary_status(channel, "Broken") == bug
        assert await link_status(links, address, "Broken") == bug
        # both paths stay up
        assert await channel.unary_unary(f"/{SERVICE}/Ok")(b"x", timeout=10) == b"X"
        assert await links.call(address, "Ok", b"y", 10) == b"Y"
    finally:
        await links.close()
        await channel.close()
        await server.stop(0)
    # a refusal is no bug: only the two RuntimeErrors left a traceback
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert sorted(tracebacks) == [
        "unhandled error in Broken",
        "unhandled error in Broken over a link",
    ]
    # counted by their own code, both ways
    sample = server.registry.get_sample_value
    assert sample("dmoe_test_rpc_requests_total", {"method": "Refuse", "code": "NOT_FOUND"}) == 2
    assert sample("dmoe_test_rpc_requests_total", {"method": "Broken", "code": "INTERNAL"}) == 2


@run_async
async def test_a_streaming_handler_refuses_by_raising(caplog: pytest.LogCaptureFixture) -> None:
    """``dmoe.Averager/DownloadState`` (a response stream) raises its refusal before the first
    chunk: the caller reads its code and message, no traceback is logged."""
    from services.averaging import Averager, AveragerConfig
    from services.common.identity import Identity
    from services.proto import averager_pb2

    caplog.set_level(logging.ERROR)
    averager = Averager(
        AveragerConfig(run_id="run"), size=8, dht=None, identity=Identity.generate(), address=""
    )
    server = await start_server(
        "trainer", averager.register, metrics_port=None, links=[averager.link]
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    download = channel.unary_stream(
        "/dmoe.Averager/DownloadState",
        request_serializer=averager_pb2.StateRequest.SerializeToString,
        response_deserializer=averager_pb2.StateChunk.FromString,
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _chunk in download(averager_pb2.StateRequest(run_id="run"), timeout=10):
                pass
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no state for that run here"
    finally:
        await channel.close()
        await server.stop(0)
    assert not [r for r in caplog.records if r.exc_info]
