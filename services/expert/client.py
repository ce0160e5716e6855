"""``ExpertClient``: remote forward/backward of experts hosted by one expert server.

Light by design: one channel per server, reused; a request is serialized once and sent as raw
bytes by one of three paths, chosen by size: up to ``link_max_bytes`` (1 MiB by default;
``Info`` whenever the link is on) over the server's peer link (``dmoe.Expert/Link``: one
long-lived stream carrying every small request, ``services.common.link``, docs/links.md);
larger ones as their own unary ``Forward``/``Backward`` call while they fit the message limit,
so they do not hold up the small ones behind them; beyond it as chunks over
``ForwardStream``/``BackwardStream``. The reply tensors are zero-copy, read-only views of the
received message (``clone()`` one before writing into it in place). Errors surface as
``services.common.errors.CallError`` carrying the server's status code (``.code``) and
message, whichever path was taken: a gRPC call's ``AioRpcError`` is wrapped here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grpc
import torch

from services.common.channels import aio_channel, channel_options
from services.common.errors import CallError
from services.common.link import LinkClient
from services.common.tensor_codec import decode, encode
from services.common.tls import TLSConfig
from services.proto import expert_pb2, tensor_pb2
from services.proto.link_pb2 import LinkBatch
from services.proto.tensor_pb2 import Compression

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_HEADROOM = 64 * 1024  # message framing and metadata
_NO_DEADLINE = 24 * 3600.0  # a link request without a timeout still needs one


def _identity(data: bytes) -> bytes:
    return data


class ExpertClient:
    """Calls one expert server (``host:port``; DNS is resolved when the channel connects)."""

    def __init__(
        self,
        address: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        stream_chunk_bytes: int = 4 * 1024 * 1024,
        tls: TLSConfig | None = None,
        link_max_bytes: int = 1024 * 1024,
    ) -> None:
        self.address = address
        self.max_message_bytes = max_message_bytes
        # requests (and replies) up to this size go over the server's link: one long-lived
        # stream for every call (services.common.link); larger ones take their own call, so
        # they do not hold up the small ones behind them. 0: never.
        self.link_max_bytes = min(link_max_bytes, max_message_bytes - _HEADROOM)
        self.chunk_bytes = max(1024, min(stream_chunk_bytes, max_message_bytes - _HEADROOM))
        self._channel = aio_channel(address, channel_options(max_message_bytes), tls)
        ch = self._channel
        self._info = ch.unary_unary(
            "/dmoe.Expert/Info",
            request_serializer=expert_pb2.InfoRequest.SerializeToString,
            response_deserializer=expert_pb2.InfoResponse.FromString,
        )
        self._unary = {
            m: ch.unary_unary(
                f"/dmoe.Expert/{m}",
                request_serializer=_identity,
                response_deserializer=expert_pb2.ExpertResponse.FromString,
            )
            for m in ("Forward", "Backward")
        }
        self._stream = {
            m: ch.stream_stream(
                f"/dmoe.Expert/{m}Stream",
                request_serializer=expert_pb2.Chunk.SerializeToString,
                response_deserializer=expert_pb2.Chunk.FromString,
            )
            for m in ("Forward", "Backward")
        }
        open_link = ch.stream_stream(
            "/dmoe.Expert/Link",
            request_serializer=LinkBatch.SerializeToString,
            response_deserializer=LinkBatch.FromString,
        )
        self._link = LinkClient(lambda: open_link())

    async def _linked(self, method: str, data: bytes, timeout: float | None) -> bytes:
        return await self._link.call(method, data, timeout or _NO_DEADLINE)

    async def info(self, uid: str, timeout: float | None = None) -> expert_pb2.InfoResponse:
        request = expert_pb2.InfoRequest(uid=uid)
        if self.link_max_bytes:
            reply = await self._linked("Info", request.SerializeToString(), timeout)
            return expert_pb2.InfoResponse.FromString(reply)
        try:
            return await self._info(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise CallError.of_rpc(exc) from None

    async def forward(
        self,
        uid: str,
        inputs: Sequence[torch.Tensor],
        *,
        timeout: float | None = None,
        compression: Compression | Sequence[Compression] = tensor_pb2.COMPRESSION_NONE,
        reply_compression: Compression | None = None,
    ) -> list[torch.Tensor]:
        """The expert's outputs for ``inputs`` (each with a leading batch dimension)."""
        return await self._call(
            "Forward", uid, list(inputs), timeout, compression, reply_compression
        )

    async def backward(
        self,
        uid: str,
        inputs: Sequence[torch.Tensor],
        grad_outputs: Sequence[torch.Tensor],
        *,
        timeout: float | None = None,
        compression: Compression | Sequence[Compression] = tensor_pb2.COMPRESSION_NONE,
        reply_compression: Compression | None = None,
    ) -> list[torch.Tensor]:
        """Gradients of the inputs; the server also applies one optimizer step to the expert."""
        tensors = [*inputs, *grad_outputs]
        return await self._call("Backward", uid, tensors, timeout, compression, reply_compression)

    async def _call(
        self,
        method: str,
        uid: str,
        tensors: list[torch.Tensor],
        timeout: float | None,
        compression: Compression | Sequence[Compression],
        reply_compression: Compression | None,
    ) -> list[torch.Tensor]:
        per_tensor = (
            [compression] * len(tensors) if isinstance(compression, int) else list(compression)
        )
        if len(per_tensor) != len(tensors):
            raise ValueError(f"{len(per_tensor)} compressions for {len(tensors)} tensors")
        if reply_compression is None:
            reply_compression = per_tensor[0] if per_tensor else tensor_pb2.COMPRESSION_NONE
        request = expert_pb2.ExpertRequest(uid=uid, reply_compression=reply_compression)
        for tensor, kind in zip(tensors, per_tensor, strict=True):
            if not tensor.dtype.is_floating_point:
                kind = tensor_pb2.COMPRESSION_NONE
            request.tensors.append(encode(tensor, kind))
        data = request.SerializeToString()
        # The reply is about as large as the request's tensors decoded (float32 outputs of
        # compressed inputs are up to 4x larger than the request): stream when either may not fit.
        reply_estimate = sum(t.numel() * t.element_size() for t in tensors)
        limit = self.max_message_bytes - _HEADROOM
        if len(data) <= self.link_max_bytes and reply_estimate <= self.link_max_bytes:
            reply = await self._linked(method, data, timeout)
            response = expert_pb2.ExpertResponse.FromString(reply)
        else:
            try:
                if len(data) <= limit and reply_estimate <= limit:
                    response = await self._unary[method](data, timeout=timeout)
                else:
                    response = await self._call_stream(method, data, timeout)
            except grpc.aio.AioRpcError as exc:
                raise CallError.of_rpc(exc) from None
        return [decode(t) for t in response.tensors]

    async def _call_stream(
        self, method: str, data: bytes, timeout: float | None
    ) -> expert_pb2.ExpertResponse:
        view, size = memoryview(data), self.chunk_bytes

        # a plain generator: grpc pulls from it as flow control allows
        def chunks() -> Iterator[expert_pb2.Chunk]:
            for i in range(0, max(len(data), 1), size):
                chunk = expert_pb2.Chunk(data=bytes(view[i : i + size]))
                if i == 0:
                    chunk.total_bytes, chunk.max_chunk_bytes = len(data), self.chunk_bytes
                yield chunk

        call = self._stream[method](chunks(), timeout=timeout)
        parts: list[bytes] = []
        async for chunk in call:
            parts.append(chunk.data)
        return expert_pb2.ExpertResponse.FromString(b"".join(parts))

    async def close(self) -> None:
        await self._link.close()
        await self._channel.close()

    async def __aenter__(self) -> ExpertClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
