"""The shared bootstrap, exercised over real gRPC on 127.0.0.1 with a tiny test service."""

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import run_async

from services.common.flags import service_parser
from services.common.server import start_server
from services.proto import tensor_pb2

SERVICE = "dmoe.test.Echo"


def _register(server: grpc.aio.Server) -> list[str]:
    async def echo(request: tensor_pb2.Tensor, context: grpc.aio.ServicerContext):
        if request.shape and request.shape[0] == 13:
            raise RuntimeError("unlucky shape")
        if request.shape and request.shape[0] == 7:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        if request.shape and request.shape[0] == 11:
            raise NotImplementedError("not yet")
        if request.shape and request.shape[0] == 12:
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            context.set_details("set before raising")
            raise ValueError("after the status was set")
        return request

    def stub(request: tensor_pb2.Tensor, context: grpc.ServicerContext) -> None:
        """What generated servicer bases do for a method nobody implemented (a plain def)."""
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")

    codec = {
        "request_deserializer": tensor_pb2.Tensor.FromString,
        "response_serializer": tensor_pb2.Tensor.SerializeToString,
    }
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, **codec),
            "Stub": grpc.unary_unary_rpc_method_handler(stub, **codec),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    return [SERVICE]


async def _health_and_reflection_are_guarded(channel: grpc.aio.Channel) -> None:
    """Corrupt bytes to health and reflection are INVALID_ARGUMENT; List lists everything."""
    garbage = b"\xff\xff\xff garbage"
    calls = [
        channel.unary_unary("/grpc.health.v1.Health/Check")(garbage),
        channel.unary_unary("/grpc.health.v1.Health/List")(garbage),
        channel.unary_stream("/grpc.health.v1.Health/Watch")(garbage).read(),
        channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
            iter([garbage])
        ).read(),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "malformed" in err.value.details()
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE)
    )
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    listed = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
    serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    assert dict(listed.statuses) == {"": serving, SERVICE: serving}


async def _scenario() -> None:
    running = await start_server("test", _register, host="127.0.0.1", port=0, metrics_port=0)
    target = f"127.0.0.1:{running.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await running.set_serving(True)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        raw = channel.unary_unary(f"/{SERVICE}/Echo")
        ok = tensor_pb2.Tensor(shape=[1, 2]).SerializeToString()
        assert await raw(ok) == ok
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\xff\xff\xff garbage")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(tensor_pb2.Tensor(shape=[13]).SerializeToString())
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "unlucky shape" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(tensor_pb2.Tensor(shape=[7]).SerializeToString())
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(b"\0" * (65 * 1024 * 1024))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await raw(ok) == ok  # still serving
        # a status the handler chose (or NotImplementedError) is kept, not INTERNAL
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(tensor_pb2.Tensor(shape=[11]).SerializeToString())
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(tensor_pb2.Tensor(shape=[12]).SerializeToString())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == "set before raising"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(f"/{SERVICE}/Stub")(ok)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert err.value.details() == "Method not implemented!"

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for answer in refl.ServerReflectionInfo(ask()):
            names = {s.name for s in answer.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names
        await _health_and_reflection_are_guarded(channel)

    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
    assert 'dmoe_build_info{service="test",version="0.1.0"} 1.0' in text
    assert 'dmoe_test_rpc_requests_total{code="OK",method="Echo"} 2.0' in text
    assert 'dmoe_test_rpc_requests_total{code="INVALID_ARGUMENT",method="Echo"} 1.0' in text
    assert 'dmoe_test_rpc_requests_total{code="INTERNAL",method="Echo"} 1.0' in text
    assert 'dmoe_test_rpc_requests_total{code="NOT_FOUND",method="Echo"} 1.0' in text
    assert "dmoe_test_rpc_duration_seconds_bucket" in text
    assert 'dmoe_test_rejected_total{reason="malformed"} 5.0' in text
    assert 'dmoe_test_rpc_requests_total{code="INVALID_ARGUMENT",method="Check"} 1.0' in text
    await running.stop(0.5)


@run_async
async def test_bootstrap_health_reflection_metrics_and_guard(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await _scenario()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert [r.getMessage() for r in tracebacks] == ["unhandled error in Echo"]  # shape 13 only


def test_env_vars_fill_flags_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMOE_PORT", "4242")
    monkeypatch.setenv("DMOE_LOG_FORMAT", "json")
    parser = service_parser("test", "test", port=1, metrics_port=2)
    parser.add_argument("--no-dht", action="store_true", help="x")
    monkeypatch.setenv("DMOE_NO_DHT", "true")
    args = parser.parse_args([])
    assert (args.port, args.log_format, args.metrics_port) == (4242, "json", 2)
    assert parser.parse_args(["--port", "5"]).port == 5
    parser2 = service_parser("test", "test", port=1, metrics_port=2)
    parser2.add_argument("--no-dht", action="store_true", help="x")
    assert parser2.parse_args([]).no_dht is True
    monkeypatch.setenv("DMOE_PORT", "abc")
    with pytest.raises(SystemExit):
        service_parser("test", "test", port=1, metrics_port=2).parse_args([])
