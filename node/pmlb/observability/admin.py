"""The admin HTTP endpoint of a node: /healthz, /readyz, /metrics, /connections.

A deliberately tiny HTTP/1.1 server on asyncio (one request per connection,
bounded header size and time) so the node needs no web framework. It binds
127.0.0.1 unless configured otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

log = logging.getLogger("pmlb.admin")

MAX_REQUEST: Final = 8192
REQUEST_TIMEOUT: Final = 5.0

Route = Callable[[str], Awaitable[tuple[int, str, bytes]]]


class AdminServer:
    """Routes are open (probes, scrapers) or protected. A protected route needs
    ``Authorization: Bearer <token>`` when a token is set, and answers only on
    a loopback address when none is; and it refuses a Host header that is not
    an address of this node (DNS rebinding: a page on evil.example that
    resolves to the node must not reach it)."""

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None = None,
        names: Sequence[str] = (),
        unix_path: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        # A worker's internal endpoint (pmlb.workers): a Unix socket in the
        # node's private run directory, which only the node's processes reach,
        # so no route there is refused.
        self.unix_path = unix_path
        self.token = token
        # Host header values accepted besides the address the client dialled.
        self.names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), *names}
        self.routes: dict[tuple[str, str], tuple[Route, bool]] = {}
        self.refused = 0
        self._server: asyncio.Server | None = None

    def route(self, method: str, path: str, handler: Route, protected: bool = False) -> None:
        self.routes[(method, path)] = (handler, protected)

    def _refusal(self, head: bytes, local: str) -> tuple[int, bytes] | None:
        """Why a protected request is refused (status, body), or None."""
        headers: dict[str, str] = {}
        for line in head.split(b"\r\n")[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        host = headers.get("host", "")
        if host.startswith("["):  # [v6]:port
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:  # name:port, v4:port
            host = host.partition(":")[0]
        if host and host != local and host not in self.names:
            return 421, b"host not served here\n"
        if self.token is None:
            if _is_loopback(local):
                return None
            return 403, b"set --admin-token to use this endpoint beyond loopback\n"
        given = headers.get("authorization", "")
        expected = f"Bearer {self.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return 401, b"a valid bearer token is required\n"
        return None

    async def start(self) -> None:
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(self._handle, self.unix_path)
            return
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
            found = self.routes.get((method, path))
            refusal = None
            if found is not None and found[1] and self.unix_path is None:
                sockname = writer.get_extra_info("sockname")
                refusal = self._refusal(head, str(sockname[0]) if sockname else "")
            if found is None:
                known = any(p == path for _, p in self.routes)
                status, ctype, body = (405 if known else 404), "text/plain", b"not found\n"
            elif refusal is not None:
                self.refused += 1
                status, body = refusal
                ctype = "text/plain"
                log.warning("admin %s %s refused (%d)", method, path, status)
            else:
                status, ctype, body = await found[0](query)
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
            401: "Unauthorized",
            403: "Forbidden",
            421: "Misdirected Request",
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


def _is_loopback(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))
