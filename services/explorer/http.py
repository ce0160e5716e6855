"""A small HTTP/1.1 server on asyncio for the explorer's page, its static files and its JSON.

Only GET and HEAD of a fixed set of paths; every response is a complete body with
``Connection: close``. Its callers are people's browsers and scripts, not peers, but it is
still bounded: request heads larger than ``MAX_HEAD_BYTES`` get 431, heads not received within
``HEAD_TIMEOUT`` are dropped, and at most ``max_connections`` connections are served at once
(more are closed at once). The bodies are rendered once per round by the caller
(:class:`Pages`), so a request costs a dictionary lookup and a write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
SECURITY_HEADERS = (
    # no inline script or style may run, whatever a peer managed to put in the page
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; "
     "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
     "frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)  # fmt: skip
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}  # fmt: skip


@dataclass(frozen=True)
class Body:
    content: bytes
    content_type: str
    cache: str = "no-store"


class HttpServer:
    """Serves ``route(path) -> Body | None`` (None: 404); ``on_request(route_name, code)``
    counts requests."""

    def __init__(
        self,
        route: Callable[[str], Body | None],
        on_request: Callable[[str, int], None],
        max_connections: int = 128,
    ) -> None:
        self.route = route
        self.on_request = on_request
        self.max_connections = max_connections
        self._open = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_HEAD_BYTES, reuse_address=True
        )
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.max_connections:
            writer.close()
            self.on_request("refused", 503)
            return
        self._open += 1
        try:
            await self._answer(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            await self._send(writer, 431, Body(b"request head too large\n", "text/plain"))
            self.on_request("bad", 431)
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._send(writer, 400, Body(b"bad request\n", "text/plain"))
            self.on_request("bad", 400)
            return
        method, target = parts[0], parts[1]
        path = urlsplit(target).path or "/"
        if method not in ("GET", "HEAD"):
            await self._send(writer, 405, Body(b"GET or HEAD only\n", "text/plain"),
                             extra=[("Allow", "GET, HEAD")])  # fmt: skip
            self.on_request("bad", 405)
            return
        body = self.route(path)
        if body is None:
            await self._send(writer, 404, Body(b"not found\n", "text/plain"), head_only=False)
            self.on_request("other", 404)
            return
        await self._send(writer, 200, body, head_only=method == "HEAD")
        self.on_request(path if path in ("/", "/fragment", "/api/swarm") else "static", 200)

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        code: int,
        body: Body,
        *,
        head_only: bool = False,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = [
            ("Content-Type", body.content_type),
            ("Content-Length", str(len(body.content))),
            ("Cache-Control", body.cache),
            ("Connection", "close"),
            *SECURITY_HEADERS,
            *(extra or []),
        ]
        head = f"HTTP/1.1 {code} {REASONS.get(code, 'Error')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        writer.write(head.encode("latin-1") + (b"" if head_only else body.content))
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
