"""A peer's input is never echoed whole: a 16 MiB uid gets a short NOT_FOUND, over real gRPC.

Before, the message repeated the uid (``repr``: x4 for control characters), the status trailer
was larger than gRPC accepts, so the caller got RESOURCE_EXHAUSTED "received metadata size
exceeds hard limit" instead of NOT_FOUND, and the copies on the way out grew the server's
memory by a multiple of the request (docs/security.md).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from helpers import serve_expert

from services.common.errors import MAX_MESSAGE_CHARS, CallError, StatusError, clip, echo
from services.proto import expert_pb2

BIG = 16 << 20


def test_echo_and_clip_copy_only_the_head() -> None:
    assert echo("ffn.1") == "'ffn.1'"
    assert echo("x" * BIG) == f"'{'x' * 80}'... ({BIG} characters)"
    escaped = echo(b"\x01" * BIG)  # escapes do not make it longer
    assert escaped.startswith("b'\\x01") and escaped.endswith(f"... ({BIG} bytes)")
    assert len(escaped) < 120
    assert len(clip("y" * BIG)) < MAX_MESSAGE_CHARS + 40
    assert len(StatusError(grpc.StatusCode.INTERNAL, "z" * BIG).message) < MAX_MESSAGE_CHARS + 40


@pytest.mark.parametrize("char", ["x", "\x01", "\u00e9"], ids=["ascii", "control", "utf8"])
def test_a_huge_uid_gets_a_short_not_found(char: str) -> None:
    async def scenario() -> None:
        async with serve_expert(experts=["ffn.0"], hidden_dim=8) as (server, client):
            options = [("grpc.max_send_message_length", 1 << 30)]
            async with grpc.aio.insecure_channel(server.address, options=options) as channel:
                for method, message in (
                    ("Forward", expert_pb2.ExpertRequest(uid=char * BIG)),
                    ("Info", expert_pb2.InfoRequest(uid=char * BIG)),
                ):
                    call = channel.unary_unary(
                        f"/dmoe.Expert/{method}", request_serializer=type(message).SerializeToString
                    )
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(message, timeout=60)
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
                    assert f"({BIG} characters)" in err.value.details()
                    assert len(err.value.details()) < 300
            # over the peer link too (what ExpertClient uses), and the server still serves
            with pytest.raises(CallError) as err:
                await client.forward(char * (1 << 20), [torch.randn(2, 8)], timeout=60)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
            assert len(err.value.message) < 300
            (out,) = await client.forward("ffn.0", [torch.randn(2, 8)], timeout=60)
            assert out.shape == (2, 8)

    asyncio.run(scenario())
