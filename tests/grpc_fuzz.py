"""A structure-aware fuzzer for any gRPC server, driven by server reflection only.

:func:`discover` lists every method a server offers (``grpc.reflection.v1alpha``) and builds
its request class from the descriptors the server sends, so the fuzzer needs no generated code
and follows the protos as they change. :class:`Fuzzer` then sends each method, as raw bytes:

(a) random bytes of various lengths,
(b) random messages built from the descriptor: every field type, nested and repeated fields,
    maps, edge values (empty, huge counts, NaN/inf, extreme and negative integers, unknown enum
    values, non-UTF-8 bytes) and strings from a dictionary (names the caller knows the server
    uses, plus every string seen in an answer or an error message),
(c) mutations (bit flips, truncation, duplication, splices) of valid inputs: seeds the caller
    may give (built from its own stubs) and inputs that got past parsing,

and records every status outside the allowed set with the input that caused it. Streaming
methods get short streams of such chunks. Seeded: the same seed sends the same inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
_INT32 = (0, 1, -1, 2, 3, 8, 16, 64, 2**31 - 1, -(2**31))
_INT64 = (*_INT32, 2**53 + 1, 2**63 - 1, -(2**63))
_UINT32 = (0, 1, 2, 3, 8, 16, 64, 2**32 - 1)
_UINT64 = (*_UINT32, 2**64 - 1)
_DOUBLE = (0.0, -0.0, 1.0, -1.5, 0.5, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324)
_FLOAT = (0.0, -0.0, 1.0, -1.5, math.nan, math.inf, -math.inf, 3.4e38, 1e-45)
_BYTE_LENGTHS = (0, 1, 2, 4, 8, 16, 19, 20, 21, 32, 64, 100, 256, 1024, 4096)
_COUNTS = (0, 1, 1, 2, 2, 3, 4, 8)
_WORD = re.compile(r"[\w.:\[\]/-]{1,200}")


@dataclass
class Method:
    path: str  # /package.Service/Method
    request: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def descriptor(self) -> Descriptor:
        return self.request.DESCRIPTOR


@dataclass
class Finding:
    path: str
    phase: str
    code: str
    details: str
    data: bytes  # the request, or the chunks of a stream joined by b"|"

    def __str__(self) -> str:
        shown = self.data[:120].hex() + ("..." if len(self.data) > 120 else "")
        return f"{self.path} [{self.phase}] -> {self.code}: {self.details!r} (input {shown})"


async def _ask(
    stub: reflection_pb2_grpc.ServerReflectionStub, **query: str
) -> reflection_pb2.ServerReflectionResponse:
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**query)]))
    async for answer in call:
        if answer.HasField("error_response"):
            raise LookupError(f"reflection {query}: {answer.error_response.error_message}")
        return answer
    raise LookupError(f"reflection {query}: no answer")


async def discover(channel: grpc.aio.Channel) -> list[Method]:
    """Every method of every service the server lists, with request classes built from the
    file descriptors it serves (dependencies fetched by file name)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    pool, added = descriptor_pool.DescriptorPool(), set[str]()

    async def add(serialized: bytes) -> None:
        proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
        if proto.name in added:
            return
        for dependency in proto.dependency:
            if dependency not in added:
                answer = await _ask(stub, file_by_filename=dependency)
                for data in answer.file_descriptor_response.file_descriptor_proto:
                    await add(data)
        if proto.name not in added:
            pool.Add(proto)
            added.add(proto.name)

    listed = await _ask(stub, list_services="")
    methods = []
    for service in sorted(s.name for s in listed.list_services_response.service):
        answer = await _ask(stub, file_containing_symbol=service)
        for data in answer.file_descriptor_response.file_descriptor_proto:
            await add(data)
        for method in pool.FindServiceByName(service).methods:
            request = message_factory.GetMessageClass(method.input_type)
            path = f"/{service}/{method.name}"
            methods.append(Method(path, request, method.client_streaming, method.server_streaming))
    return methods


class Generator:
    """Random messages from a descriptor, biased toward edge values and known strings."""

    def __init__(self, rng: random.Random, dictionary: list[str], max_depth: int = 4) -> None:
        self.rng = rng
        self.dictionary = dictionary
        self.max_depth = max_depth

    def message(self, cls: type[Message]) -> Message:
        message = cls()
        self._fill(message, 0)
        return message

    def _fill(self, message: Message, depth: int) -> None:
        rng = self.rng
        for fd in message.DESCRIPTOR.fields:
            if rng.random() < 0.3:
                continue
            # a value the field's type cannot hold leaves the field as it was
            with contextlib.suppress(ValueError, TypeError, OverflowError):
                self._set(message, fd, depth)

    def _count(self, fd: FieldDescriptor) -> int:
        rng = self.rng
        if rng.random() < 0.03:  # a huge count, still far below the message size limit
            return rng.choice((1000, 20_000)) if fd.message_type is None else 1000
        return rng.choice(_COUNTS)

    def _set(self, message: Message, fd: FieldDescriptor, depth: int) -> None:
        target = getattr(message, fd.name)
        entry = fd.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_fd, value_fd = entry.fields_by_name["key"], entry.fields_by_name["value"]
            for _ in range(self._count(fd) if depth < self.max_depth else 0):
                key = self._scalar(key_fd)
                if value_fd.message_type is not None:
                    self._fill(target[key], depth + 1)
                else:
                    target[key] = self._scalar(value_fd)
        elif fd.is_repeated:
            if entry is not None:
                for _ in range(self._count(fd) if depth < self.max_depth else 0):
                    self._fill(target.add(), depth + 1)
            else:
                target.extend(self._scalar(fd) for _ in range(self._count(fd)))
        elif entry is not None:
            target.SetInParent()
            if depth < self.max_depth:
                self._fill(target, depth + 1)
        else:
            setattr(message, fd.name, self._scalar(fd))

    def _scalar(self, fd: FieldDescriptor) -> Any:
        rng, kind = self.rng, fd.cpp_type
        if kind == FieldDescriptor.CPPTYPE_BOOL:
            return rng.random() < 0.5
        if kind == FieldDescriptor.CPPTYPE_ENUM:
            values = [v.number for v in fd.enum_type.values]
            return rng.choice(values) if rng.random() < 0.7 else rng.choice((-1, 99, 2**31 - 1))
        if kind in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
            edges = _DOUBLE if kind == FieldDescriptor.CPPTYPE_DOUBLE else _FLOAT
            pick = rng.random()
            if pick < 0.5:
                return rng.choice(edges)
            if pick < 0.7:  # "now" and around it: expirations, timestamps
                return time.time() + rng.uniform(-1000.0, 10_000.0)
            return rng.uniform(-1e6, 1e6)
        if kind == FieldDescriptor.CPPTYPE_STRING:
            if fd.type == FieldDescriptor.TYPE_BYTES:
                return self.blob()
            return self.text()
        edges, low, high = {
            FieldDescriptor.CPPTYPE_INT32: (_INT32, -(2**31), 2**31 - 1),
            FieldDescriptor.CPPTYPE_INT64: (_INT64, -(2**63), 2**63 - 1),
            FieldDescriptor.CPPTYPE_UINT32: (_UINT32, 0, 2**32 - 1),
            FieldDescriptor.CPPTYPE_UINT64: (_UINT64, 0, 2**64 - 1),
        }[kind]
        return rng.choice(edges) if rng.random() < 0.7 else rng.randint(low, high)

    def blob(self) -> bytes:
        rng = self.rng
        if self.dictionary and rng.random() < 0.15:
            return rng.choice(self.dictionary).encode()
        huge = rng.random() < 0.02
        size = rng.randint(1 << 20, 4 << 20) if huge else rng.choice(_BYTE_LENGTHS)
        return rng.choice((b"\0", b"\xff")) * size if rng.random() < 0.1 else rng.randbytes(size)

    def text(self) -> str:
        rng = self.rng
        pick = rng.random()
        if self.dictionary and pick < 0.5:
            word = rng.choice(self.dictionary)
            return word if rng.random() < 0.8 else word + rng.choice(("x", ".0", ":", "\0", "é"))
        if pick < 0.6:
            return ""
        if pick < 0.65:
            return "a" * rng.choice((1000, 100_000))
        alphabet = "abc.:[]/-_019 \t\n\0é漢🙂\u202e"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """One random mutation of ``data``: bit flips, cuts, copies, splices, edge bytes."""
    buf = bytearray(data)
    choice = rng.randrange(8) if buf else 6
    if choice == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif choice == 1:
        del buf[rng.randrange(len(buf)) :]
    elif choice == 2:
        buf += data
    elif choice == 3:
        i, j = sorted(rng.randrange(len(buf) + 1) for _ in range(2))
        k = rng.randrange(len(buf) + 1)
        buf[k:k] = buf[i:j]
    elif choice == 4:
        i, j = sorted(rng.randrange(len(buf) + 1) for _ in range(2))
        del buf[i:j]
    elif choice == 5:
        buf[rng.randrange(len(buf))] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
    elif choice == 6:
        k = rng.randrange(len(buf) + 1)
        buf[k:k] = rng.randbytes(rng.randint(1, 16))
    else:
        other = rng.choice(corpus) if corpus else b""
        buf = buf[: rng.randrange(len(buf) + 1)] + other[rng.randrange(len(other) + 1) :]
    return bytes(buf)


# A client-side status, not the server's: the server ended a request stream (say, INVALID_ARGUMENT
# on a bad chunk) while this client was still sending the next chunk; grpcio reports the
# failed send as INTERNAL "Internal error from Core" and the server's status is lost.
_WRITE_AFTER_END = "CLIENT_WROTE_AFTER_END"


def _written_after_end(exc: grpc.aio.AioRpcError) -> bool:
    return exc.details() == "Internal error from Core" and "SendMessageOperation" in (
        exc.debug_error_string() or ""
    )


@dataclass
class Fuzzer:
    """Sends bounded, seeded inputs to every method of one server; collects findings."""

    channel: grpc.aio.Channel
    seed: int = 0
    dictionary: list[str] = field(default_factory=list)
    # valid inputs to start mutating from: method path -> requests, each a list of chunks
    seeds: dict[str, list[list[bytes]]] = field(default_factory=dict)
    cases: int = 120  # per phase and unary method; streams get cases // 8 streams per phase
    seconds_per_method: float = 3.0
    concurrency: int = 4
    timeout: float = 10.0
    stream_wait: float = 0.5  # how long to wait for each answer of a response stream
    allowed: frozenset[grpc.StatusCode] = ALLOWED
    findings: list[Finding] = field(default_factory=list)
    codes: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> code -> calls
    examples: dict[str, str] = field(default_factory=dict)  # "path CODE" -> first details

    async def run(self, methods: list[Method]) -> None:
        for method in methods:
            await self.fuzz(method)

    async def fuzz(self, method: Method) -> None:
        rng = random.Random(self.seed ^ zlib.crc32(method.path.encode()))
        generator = Generator(rng, self.dictionary)
        # inputs that got past parsing, as lists of chunks (one for a unary request); those
        # answered OK (the seeds too) are mutated more often: they reach deeper
        corpus: list[list[bytes]] = [[b""], *self.seeds.get(method.path, [])]
        good = list(corpus[1:])
        streaming = method.client_streaming
        count = max(2, self.cases // 8) if streaming else self.cases

        def random_bytes() -> bytes:
            return rng.randbytes(rng.choice((1, 2, 3, 5, 8, 13, 64, 300, 5000)))

        def structured() -> bytes:
            return generator.message(method.request).SerializeToString()

        def made(make: Callable[[], bytes]) -> Callable[[], list[bytes]]:
            return lambda: [make() for _ in range(rng.randint(1, 4) if streaming else 1)]

        def mutated() -> list[bytes]:
            chunks = list(rng.choice(good if good and rng.random() < 0.7 else corpus))
            flat = [c for seed in corpus for c in seed]
            i = rng.randrange(len(chunks))
            if streaming and rng.random() < 0.3:  # the stream's shape: drop or repeat a chunk
                if rng.random() < 0.5 and len(chunks) > 1:
                    del chunks[i]
                else:
                    chunks.insert(i, chunks[i])
            else:
                chunks[i] = mutate(rng, chunks[i], flat)
            return chunks

        seeds = iter(list(corpus[1:]))
        phases: list[tuple[str, Callable[[], list[bytes]]]] = [
            ("seed", lambda: list(next(seeds))),
            ("random", made(random_bytes)), ("structured", made(structured)),
            ("mutated", mutated),
        ]  # fmt: skip
        for phase, make in phases if len(corpus) > 1 else phases[1:]:
            deadline = time.monotonic() + self.seconds_per_method / 3
            todo = len(corpus) - 1 if phase == "seed" else count
            for start in range(0, todo, self.concurrency):
                if time.monotonic() > deadline:
                    break
                batch = [make() for _ in range(min(self.concurrency, todo - start))]
                codes = await asyncio.gather(*(self._send(method, phase, b) for b in batch))
                for chunks, code in zip(batch, codes, strict=True):
                    passed = code not in (grpc.StatusCode.INVALID_ARGUMENT, _WRITE_AFTER_END)
                    if passed and phase != "seed" and len(corpus) < 64:
                        corpus.append([c for c in chunks if len(c) < 1 << 16] or [b""])
                        if code == grpc.StatusCode.OK:
                            good.append(corpus[-1])

    async def _send(self, method: Method, phase: str, chunks: list[bytes]) -> grpc.StatusCode | str:
        """One call; its status (OK when we hung up on a live response stream ourselves)."""
        if method.client_streaming:
            multi = (
                self.channel.stream_stream if method.server_streaming else self.channel.stream_unary
            )
            call = multi(method.path)(iter(chunks), timeout=self.timeout)
        else:
            single = (
                self.channel.unary_stream if method.server_streaming else self.channel.unary_unary
            )
            call = single(method.path)(chunks[0], timeout=self.timeout)
        try:
            if not method.server_streaming:
                self._harvest(await call)
                return self._count(method, grpc.StatusCode.OK)
            for _ in range(3):  # a few answers, then hang up (Watch never ends)
                try:
                    reply = await asyncio.wait_for(call.read(), self.stream_wait)
                except TimeoutError:  # no answer yet: hang up (the cancelled read did)
                    call.cancel()
                    return self._count(method, grpc.StatusCode.OK)
                if reply is grpc.aio.EOF:
                    break
                self._harvest(reply)
            if not call.done():
                call.cancel()
                return self._count(method, grpc.StatusCode.OK)
            code, details = await call.code(), await call.details()
        except grpc.aio.AioRpcError as exc:
            if method.client_streaming and _written_after_end(exc):
                return self._count(method, _WRITE_AFTER_END)
            code, details = exc.code(), exc.details() or ""
        self._harvest(details or "")
        self.examples.setdefault(f"{method.path} {code.name}", details or "")
        if code not in self.allowed:
            self.findings.append(
                Finding(method.path, phase, code.name, details or "", b"|".join(chunks))
            )
        return self._count(method, code)

    def _count(self, method: Method, code: grpc.StatusCode | str) -> grpc.StatusCode | str:
        counts = self.codes.setdefault(method.path, {})
        name = getattr(code, "name", code)
        counts[name] = counts.get(name, 0) + 1
        return code

    def _harvest(self, answer: bytes | str) -> None:
        """Strings the server said become dictionary words (uids, addresses, names)."""
        if len(self.dictionary) >= 256:
            return
        text = answer if isinstance(answer, str) else answer[:4096].decode("latin-1")
        for word in _WORD.findall(text)[:8]:
            if len(word) > 2 and word not in self.dictionary:
                self.dictionary.append(word)
