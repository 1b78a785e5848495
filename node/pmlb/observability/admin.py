"""The admin HTTP endpoint of a node: /healthz, /readyz, /metrics, /connections.

A deliberately tiny HTTP/1.1 server on asyncio (one request per connection,
bounded header size and time) so the node needs no web framework. It binds
127.0.0.1 unless configured otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from pmlb.protocol.domain import is_loopback

log = logging.getLogger("pmlb.admin")

MAX_REQUEST: Final = 8192
REQUEST_TIMEOUT: Final = 5.0
# Asked for by machines under whatever name an operator gives them (probes,
# Prometheus): no Host check, and nothing in them a rebinding page could use.
MACHINE_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
# Every response: no sniffing, no framing (clickjacking), scripts and
# requests only from this origin (the pages' inline script is their own).
SECURITY_HEADERS: Final = (
    "X-Content-Type-Options: nosniff\r\n"
    "X-Frame-Options: DENY\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "Content-Security-Policy: default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'\r\n"
)

Route = Callable[[str], Awaitable[tuple[int, str, bytes]]]


class AdminServer:
    """Routes are open (probes, scrapers, the pages) or protected. A protected
    route needs ``Authorization: Bearer <token>`` when a token is set, and
    answers only on a loopback address when none is.

    Every route but the machine ones (MACHINE_PATHS) refuses a Host header
    that is not an address or name of this node (DNS rebinding: a page on
    evil.example that resolves to the node must not read or drive it). A
    request that changes state (any method but GET and HEAD) is refused when
    its Origin or Sec-Fetch-Site names another site, token or no token: a
    cross-site form or fetch cannot drain the node or close a client, while
    the node's own pages and scripts (which send neither, or same-origin)
    can."""

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
        # A worker's internal endpoint (pmlb.node.workers): a Unix socket in the
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

    def _refusal(
        self, method: str, path: str, headers: dict[str, str], local: str, protected: bool
    ) -> tuple[int, bytes] | None:
        """Why a request is refused (status, body), or None."""
        if path not in MACHINE_PATHS:
            host = _hostname(headers.get("host", ""))
            if host and host != local and host not in self.names:
                return 421, b"host not served here\n"
        if method not in ("GET", "HEAD") and self._cross_site(headers):
            return 403, b"cross-site request refused: it would change state\n"
        if not protected:
            return None
        if self.token is None:
            if is_loopback(local):
                return None
            return 403, b"set --admin-token to use this endpoint beyond loopback\n"
        given = headers.get("authorization", "")
        expected = f"Bearer {self.token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return 401, b"a valid bearer token is required\n"
        return None

    @staticmethod
    def _cross_site(headers: dict[str, str]) -> bool:
        """Whether a browser says the request comes from another site."""
        site = headers.get("sec-fetch-site", "").lower()
        if site in ("cross-site", "same-site"):
            return True
        origin = headers.get("origin")
        if origin is None:
            return False  # not a browser's cross-origin request (curl, scripts)
        _, sep, rest = origin.partition("://")
        # "null" (sandboxed frames, file: pages) or another host:port.
        return not sep or rest.rstrip("/").lower() != headers.get("host", "").lower()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on ``host:port``, or on ``sock`` (the listener a live
        handover passed on from the node's previous process)."""
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(self._handle, self.unix_path)
            return
        if sock is not None:
            self._server = await asyncio.start_server(self._handle, sock=sock)
        else:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("admin HTTP on %s:%d", self.host, self.port)

    def listening_socket(self) -> socket.socket | None:
        """The TCP listener, for a live handover (None on a Unix socket)."""
        if self._server is None or self.unix_path is not None or not self._server.sockets:
            return None
        return self._server.sockets[0]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            path, _, query = target.partition("?")
            found = self.routes.get((method, path))
            refusal = None
            if found is not None and self.unix_path is None:
                sockname = writer.get_extra_info("sockname")
                refusal = self._refusal(
                    method,
                    path,
                    _headers(head),
                    str(sockname[0]) if sockname else "",
                    found[1],
                )
            if found is None:
                known = any(p == path for _, p in self.routes)
                status, ctype, body = (405 if known else 404), "text/plain", b"not found\n"
            elif refusal is not None:
                self.refused += 1
                status, body = refusal
                ctype = "text/plain"
                log.warning("admin %s %s refused (%d)", method, path, status)
            else:
                try:
                    status, ctype, body = await found[0](query)
                except (ValueError, ConnectionError):
                    raise  # a bad query or a peer gone: closed, below
                except Exception:  # a bug in a route: answer, and keep serving
                    log.exception("admin %s %s failed", method, path)
                    status, ctype, body = 500, "text/plain", b"internal error\n"
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
            500: "Internal Server Error",
            503: "Service Unavailable",
        }.get(status, "OK")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{SECURITY_HEADERS}Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        writer.close()


def _headers(head: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _hostname(host: str) -> str:
    """The name or address of a Host header, without its port."""
    if host.startswith("["):  # [v6]:port
        return host[1:].partition("]")[0]
    if host.count(":") == 1:  # name:port, v4:port
        return host.partition(":")[0]
    return host


def json_body(obj: object) -> bytes:
    return json.dumps(obj, indent=1).encode() + b"\n"
