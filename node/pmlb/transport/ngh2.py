"""The node's Bridge streams on libnghttp2: ``--link-transport nghttp2``.

The byte work (HTTP/2 framing and parsing, gRPC's message prefixes, the
copies between them) is in C: libnghttp2, bound by ``_nghttp2`` (Cython,
built by ``make install`` when Cython, a C compiler and ``libnghttp2-dev``
are there). This module is its asyncio side: one TCP (or TLS) connection per
link carrying one Bridge stream, keepalive PINGs, and what the link's
hung-peer watchdog reads.

Only the node's end is native. An upstream asked for ``nghttp2`` (the SDK's
``transport=`` or ``PMLB_LINK_TRANSPORT``) is served by grpclib, which any
node transport reaches: the transports are interchangeable on the wire.

When the extension is not built, ``available()`` is False, ``why_not()``
says why, and the node falls back to grpclib and logs it at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, cast
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError

from pmlb import __version__
from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
from pmlb.protocol import wire
from pmlb.protocol.domain import parse_hostport
from pmlb.transport.base import (
    KEEPALIVE_TIME,
    KEEPALIVE_TIMEOUT,
    MAX_FRAME_SIZE,
    WINDOW_SIZE,
    ClientTLS,
    StreamEnded,
    TransportError,
    client_ssl_context,
)
from pmlb.transport.tcpinfo import PROGRESS_BYTES, Progress

_WHY_NOT = ""
# By its full name: "from pmlb.transport import" would read as this module
# importing the package whose __init__ imports it (tests/unit/test_layout.py).
if TYPE_CHECKING:
    import pmlb.transport._nghttp2 as _nghttp2  # noqa: PLR0402
else:
    try:
        import pmlb.transport._nghttp2 as _nghttp2  # noqa: PLR0402
    except ImportError as exc:  # not built: the node falls back to grpclib
        _nghttp2 = None
        _WHY_NOT = f"the native module is not built ({exc})"

log = logging.getLogger("pmlb.transport")

USER_AGENT: Final = f"pmlb/{__version__} (nghttp2)".encode()
_STATUS_NAMES: Final = {code.value[0]: code.name for code in grpc.StatusCode}


def available() -> bool:
    """The native transport is built and loads."""
    return _nghttp2 is not None


def why_not() -> str:
    """Why ``available()`` is False (for the start-up log line)."""
    return "" if available() else _WHY_NOT


def library_version() -> str:
    return _nghttp2.library_version() if _nghttp2 is not None else ""


class _Conn(asyncio.Protocol):
    """One link's connection: feeds the session what arrives, writes what it
    produces, wakes whoever waits on the stream, and keeps the PINGs."""

    def __init__(self, session: _nghttp2.ClientStream, peer: str) -> None:
        self.s = session
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.error: str | None = None
        self.paused = False
        self.progress = Progress()
        self._waiters: list[asyncio.Future[None]] = []
        self._ping: asyncio.TimerHandle | None = None
        self._acked = 0
        self._moved_at_ping = (0, 0)

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.progress.attach(transport.get_extra_info("socket"))
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
            self.fail("the upstream's TLS did not agree to HTTP/2 (ALPN h2)")
            transport.close()
            return
        self._ping = asyncio.get_running_loop().call_later(KEEPALIVE_TIME, self._send_ping)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            self.s.receive(data)
        except _nghttp2.H2Error as exc:
            # libnghttp2 cannot go on (a peer breaking HTTP/2 is answered in
            # flush, by the GOAWAY it queues): send what it has, then close.
            self.fail(f"HTTP/2 error: {exc}")
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        self.flush()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close: a half-closed HTTP/2 connection is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection lost: {exc}" if exc else "the upstream closed the connection")
        if self._ping is not None:
            self._ping.cancel()
            self._ping = None
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    # -- for the stream ------------------------------------------------------------

    def flush(self) -> None:
        """Write what the session has to send: frames of queued messages (as
        far as the peer's windows allow), WINDOW_UPDATEs, PING answers."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            out = self.s.output()
        except _nghttp2.H2Error as exc:
            self.fail(f"HTTP/2 error: {exc}")
            transport.close()
            return
        if len(out) == 1:
            transport.write(out[0])
        elif out:
            transport.writelines(out)
        if self.s.local_error:
            # The peer broke HTTP/2: libnghttp2 answered with the GOAWAY just
            # written, which says why; this connection is done.
            code = self.s.describe_code(self.s.local_error)
            self.fail(f"HTTP/2 protocol error from the peer ({code}); sent GOAWAY")
            transport.close()

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self._wake()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.flush()
            transport.close()

    async def changed(self) -> None:
        """Until something arrives, the connection ends, or writing resumes."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _wake(self) -> None:
        if not self._waiters:
            return  # every data_received calls this: no list made for nobody
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- keepalive -----------------------------------------------------------------

    def _send_ping(self) -> None:
        """PING every KEEPALIVE_TIME; a peer that leaves one unanswered for
        KEEPALIVE_TIMEOUT while no data moves either way is gone (on a slow,
        busy link the answer waits behind data that is still moving)."""
        if self.transport is None:
            return
        self._acked = self.s.pings_acked
        self._moved_at_ping = self.progress.moved()
        self.s.ping()
        self.flush()
        self._ping = asyncio.get_running_loop().call_later(KEEPALIVE_TIMEOUT, self._check_ping)

    def _check_ping(self) -> None:
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        if self.s.pings_acked > self._acked:
            self._ping = loop.call_later(KEEPALIVE_TIME - KEEPALIVE_TIMEOUT, self._send_ping)
            return
        now, before = self.progress.moved(), self._moved_at_ping
        if max(now[0] - before[0], now[1] - before[1]) >= PROGRESS_BYTES:
            self._moved_at_ping = now
            self._ping = loop.call_later(KEEPALIVE_TIMEOUT, self._check_ping)
            return
        log.info("link to %s: keepalive unanswered, no data moving", self.peer)
        self.fail("keepalive PING unanswered")
        self.close()


class _Client:
    """transport.base.ClientStream on one _Conn."""

    __slots__ = ("_addr", "_cancelled", "_conn", "_s", "_ssl", "_started")

    def __init__(
        self,
        addr: tuple[str, int],
        ssl_context: ssl.SSLContext | None,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        assert _nghttp2 is not None
        self._addr = addr
        self._ssl = ssl_context
        self._s = _nghttp2.ClientStream(headers, WINDOW_SIZE, MAX_FRAME_SIZE, wire.GRPC_MAX_MESSAGE)
        self._conn = _Conn(self._s, f"{addr[0]}:{addr[1]}")
        self._started: asyncio.Future[None] | None = None
        self._cancelled = False

    async def _start(self) -> None:
        """Connect, once, for whoever comes first (the reader may be waiting
        before the writer has sent anything)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._open())
        await asyncio.shield(self._started)

    async def _open(self) -> None:
        host, port = self._addr
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: self._conn,
                host,
                port,
                ssl=self._ssl,
                server_hostname=host if self._ssl is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot connect to {host}:{port}: {exc}") from None

    def _broken(self) -> str | None:
        if self._cancelled:
            return "cancelled"
        return self._conn.error

    async def write(self, batch: pb.Batch) -> None:
        if self._cancelled:
            raise TransportError("cancelled")
        await self._start()
        s, conn = self._s, self._conn
        if s.closed or s.ended:
            raise TransportError(self._status_text() or "the stream is closed")
        s.send(batch.SerializeToString())
        conn.flush()
        # Done when the whole message is framed and handed to the socket, as
        # grpclib's send_message: the caller's next Batch waits for the
        # peer's window, which is the link's backpressure.
        while s.queued or conn.paused:
            why = self._broken()
            if why is not None:
                raise TransportError(why)
            if s.closed:
                raise TransportError(self._status_text() or "the stream is closed")
            await conn.changed()

    async def read(self) -> pb.Batch | None:
        if self._cancelled:
            raise TransportError("cancelled")
        await self._start()
        s, conn = self._s, self._conn
        while True:
            taken = s.take()
            if taken is not None:
                data, size = taken
                s.consume(size)
                conn.flush()  # a WINDOW_UPDATE, when half the window is back
                if data is None:
                    log.warning("dropped a message over %d bytes unread", wire.GRPC_MAX_MESSAGE)
                    return None
                if s.compressed:
                    conn.close()
                    raise TransportError("UNIMPLEMENTED: compressed messages are not accepted")
                try:
                    return pb.Batch.FromString(data)
                except DecodeError:
                    return None
            if s.ended or s.closed:
                self._end()
            why = self._broken()
            if why is not None:
                raise TransportError(self._status_text() or why)
            await conn.changed()

    def _end(self) -> None:
        """The peer ended the stream: StreamEnded for OK, else TransportError."""
        s = self._s
        if s.partial():
            raise TransportError("the stream ended inside a message")
        text = self._status_text()
        if text:
            raise TransportError(text)
        raise StreamEnded("the peer ended the stream")

    def _status_text(self) -> str:
        """'' for a stream that ended with grpc-status 0; else what went wrong."""
        s = self._s
        trailers = s.trailers if s.trailers is not None else s.headers
        status = trailers.get("grpc-status")
        if status is not None:
            if status == "0":
                return ""
            name = _STATUS_NAMES.get(int(status) if status.isdigit() else -1, f"status {status}")
            return f"{name}: {unquote(trailers.get('grpc-message', ''))}"
        if s.reset_code:
            return f"stream reset by the peer: {s.describe_code(s.reset_code)}"
        http = s.headers.get(":status")
        if http is not None and http != "200":
            return f"HTTP status {http} from the upstream (not a gRPC server?)"
        if s.ended:
            return "the stream ended without a gRPC status"
        return ""

    async def done_writing(self) -> None:
        if self._broken() is not None:
            raise TransportError(self._broken() or "")
        self._s.end()
        self._conn.flush()

    def cancel(self) -> None:
        """Reset the stream and close the connection: a pending read fails at once."""
        self._cancelled = True
        self._s.cancel()
        self._conn.fail("cancelled")
        self._conn.close()

    def last_data(self) -> float:
        return self._conn.progress.last_data()

    def tcp_state(self) -> str:
        return self._conn.progress.tcp_state()

    async def close(self) -> None:
        self._cancelled = True
        if self._started is not None and not self._started.done():
            self._started.cancel()
        self._conn.fail("closed")
        self._conn.close()


def open_client(addr: str, *, tls: ClientTLS | None, metadata: Mapping[str, str]) -> _Client:
    host, port = parse_hostport(addr)
    context = client_ssl_context(tls) if tls is not None else None
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https" if context is not None else b"http"),
        (b":path", wire.BRIDGE_METHOD.encode()),
        (b":authority", (f"[{host}]" if ":" in host else host).encode() + f":{port}".encode()),
        (b"content-type", b"application/grpc+proto"),
        (b"te", b"trailers"),
        (b"user-agent", USER_AGENT),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in metadata.items()]
    return _Client((host, port), context, headers)
