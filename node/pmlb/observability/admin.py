"""The admin HTTP endpoint of a node: /healthz, /readyz, /metrics, /connections.

A deliberately tiny HTTP/1.1 server on asyncio (one request per connection,
bounded header size and time) so the node needs no web framework. It binds
127.0.0.1 unless configured otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Final

log = logging.getLogger("pmlb.admin")

MAX_REQUEST: Final = 8192
REQUEST_TIMEOUT: Final = 5.0

Route = Callable[[str], Awaitable[tuple[int, str, bytes]]]


class AdminServer:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.routes: dict[tuple[str, str], Route] = {}
        self._server: asyncio.Server | None = None

    def route(self, method: str, path: str, handler: Route) -> None:
        self.routes[(method, path)] = handler

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("admin HTTP on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            path, _, query = target.partition("?")
            handler = self.routes.get((method, path))
            if handler is None:
                known = any(p == path for _, p in self.routes)
                status, ctype, body = (405 if known else 404), "text/plain", b"not found\n"
            else:
                status, ctype, body = await handler(query)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
            ConnectionError,
        ):
            writer.close()
            return
        reason = {
            200: "OK",
            404: "Not Found",
            405: "Method Not Allowed",
            503: "Service Unavailable",
        }.get(status, "OK")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        writer.close()


def json_body(obj: object) -> bytes:
    return json.dumps(obj, indent=1).encode() + b"\n"
