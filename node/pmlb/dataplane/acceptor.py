"""Accepting client connections, with a pause.

asyncio's servers cannot stop accepting without closing the listening socket
(which would reset everyone waiting in the backlog). pmlb owns the listening
socket and accepts itself, so it can pause: at ``--max-connections`` it stops
reading the socket and new clients wait in the kernel's backlog until a mark
closes; when the process runs out of file descriptors (EMFILE), it pauses for
a moment instead of spinning or crashing, and everyone already connected is
served as before.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Final

from pmlb.dataplane import proxyproto
from pmlb.dataplane.proxyproto import ProxyHeader

log = logging.getLogger("pmlb.acceptor")

ACCEPTS_PER_WAKEUP: Final = 128
RESOURCE_ERRORS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
RESOURCE_PAUSE: Final = 0.1


class Acceptor:
    def __init__(
        self,
        host: str,
        port: int,
        backlog: int,
        factory: Callable[[ProxyHeader | None], asyncio.Protocol],
        at_limit: Callable[[], bool],
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
        rate: float = 0.0,
        proxy_before_tls: Callable[[str], bool] | None = None,
        proxy_failed: Callable[[str, int, str], None] | None = None,
        reuse_port: bool = False,
        keepalive: float = 0.0,
        gate: AbstractContextManager[Any] | None = None,
        counted: Callable[[int], None] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        # A node of several workers (pmlb.dataplane.siblings.NodeCounters):
        # the limit check, the accept and counting the new socket happen under
        # ``gate`` (a lock all workers take), so two workers never both take
        # the last free slot; ``counted(extra)`` publishes this worker's count.
        self.gate = gate
        self.counted = counted
        # factory(header): the protocol for one connection; header is the PROXY
        # header already read (before TLS) for trusted peers, else None.
        self.factory = factory
        # With TLS, a trusted load balancer (HAProxy send-proxy, AWS NLB) sends
        # its PROXY header in clear *before* the client's TLS handshake: for
        # peers this says yes to, it is read from the raw socket first.
        self.proxy_before_tls = proxy_before_tls
        self.proxy_failed = proxy_failed
        # Token bucket for --accept-rate: up to ``rate`` accepts a second, bursts
        # of one second's worth; when empty, accepting pauses until a token is due.
        self.rate = rate
        self.tokens = rate
        self.refilled = time.monotonic()
        self.rate_pauses = 0
        self.at_limit = at_limit
        # --client-keepalive: see keepalive_options().
        self.keepalive = keepalive
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # ``sock``: a listener handed over by the node's previous process.
        self.sock = sock or socket.create_server(
            (host, port), family=family, backlog=backlog, reuse_port=reuse_port
        )
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.reading = False
        self.closed = False
        self.paused_at_limit = False
        self.resource_errors = 0
        self.limit_pauses = 0
        self._logged = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.resume()

    @property
    def in_flight(self) -> int:
        """Accepted sockets whose connection is still being set up (TLS handshakes)."""
        return len(self._tasks)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def resume(self) -> None:
        if not self.reading and not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._ready)
            self.reading = True
            self.paused_at_limit = False

    def pause(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.sock.fileno())
            self.reading = False

    def close(self) -> None:
        self.pause()
        self.closed = True
        self.sock.close()

    def _ready(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            if self.gate is None:
                conn = self._accept_one()
            else:
                with self.gate:
                    conn = self._accept_one()
                    if conn is not None and self.counted is not None:
                        self.counted(1)  # before a sibling may look
            if conn is None:
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.keepalive:
                for level, option, value in keepalive_options(self.keepalive):
                    conn.setsockopt(level, option, value)
            task = self.loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._set_up)

    def _accept_one(self) -> socket.socket | None:
        """One client socket, or None: nothing to accept, or accepting paused."""
        if self.at_limit():
            self.pause()
            self.paused_at_limit = True
            self.limit_pauses += 1
            self._log(
                "at the connection limit: accepting paused, new clients wait in the listen backlog"
            )
            return None
        if self.rate and not self._take_token():
            self.pause()
            self.rate_pauses += 1
            self._log(f"accept rate limit ({self.rate:g}/s) reached: new clients wait")
            self.loop.call_later(1.0 / self.rate, self.resume)
            return None
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:
                self.resource_errors += 1
                self._log(f"accept failed ({exc.strerror}): pausing {RESOURCE_PAUSE}s")
                self.pause()
                self.loop.call_later(RESOURCE_PAUSE, self.resume)
            else:
                self._log(f"accept failed: {exc}")
            return None
        return conn

    def _set_up(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if self.counted is not None:
            self.counted(0)
        # A connection can be counted both as open and as in flight for a moment,
        # which may pause us just under the limit: look again once it settles.
        if self.paused_at_limit and not self.closed and not self.at_limit():
            self.resume()

    def set_rate(self, rate: float) -> None:
        """A new --accept-rate (SIGHUP); 0 lifts the limit."""
        self.rate = rate
        self.tokens = min(self.tokens, rate)
        if not rate and not self.paused_at_limit:
            self.resume()

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    async def _connect(self, conn: socket.socket) -> None:
        try:
            if self.ssl_context is not None:
                header = None
                peer = conn.getpeername()
                if self.proxy_before_tls is not None and self.proxy_before_tls(peer[0]):
                    try:
                        header = await self._read_proxy_header(conn)
                    except (proxyproto.BadProxyHeader, TimeoutError) as exc:
                        if self.proxy_failed is not None:
                            self.proxy_failed(peer[0], peer[1], str(exc) or "timed out")
                        conn.close()
                        return
                await self.loop.connect_accepted_socket(
                    lambda: self.factory(header),
                    conn,
                    ssl=self.ssl_context,
                    ssl_handshake_timeout=self.handshake_timeout,
                )
            else:
                await self.loop.connect_accepted_socket(lambda: self.factory(None), conn)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # A TLS handshake that failed or timed out: only that client is gone.
            log.debug("connection setup failed: %r", exc)
            conn.close()

    async def _read_proxy_header(self, conn: socket.socket) -> ProxyHeader:
        """Read exactly one PROXY header off the raw socket (the TLS handshake
        that follows stays in the kernel): peek until it parses, then consume
        its bytes. Bounded by the handshake timeout and the header's size."""
        timeout = self.handshake_timeout or 5.0
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                await self._readable(conn)
                peek = conn.recv(proxyproto.MAX_V2, socket.MSG_PEEK)
                if not peek:
                    raise proxyproto.BadProxyHeader("closed before a complete PROXY header")
                header, used = proxyproto.parse(peek)
                if header is not None:
                    conn.recv(used)
                    return header
                if len(peek) == seen:  # nothing new: the rest is on its way
                    await asyncio.sleep(0.005)
                seen = len(peek)

    async def _readable(self, conn: socket.socket) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        fd = conn.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            self.loop.remove_reader(fd)

    def _log(self, what: str) -> None:
        now = time.monotonic()
        if now - self._logged > 1.0:  # at most once a second, even under a flood
            self._logged = now
            log.warning("listener %s:%d: %s", *self.address, what)


# Keepalive probes sent after the idle time, before the peer counts as gone.
KEEPALIVE_PROBES = 3


def keepalive_options(idle: float) -> list[tuple[int, int, int]]:
    """Socket options for --client-keepalive ``idle`` seconds.

    A client that vanished without a FIN or RST (power cut, NAT timeout, a
    partition) is otherwise never noticed by a node that has nothing to send
    it: its mark would stay open, and its upstream think it connected, for
    ever. With these, the kernel probes a connection silent for ``idle``
    seconds every ``idle / 6`` and gives up after 3 unanswered probes (at
    ``1.5 * idle``); TCP_USER_TIMEOUT gives up at the same bound on data the
    client does not acknowledge. Either way the read fails (ETIMEDOUT) and the
    mark closes as ``client_reset``.
    """
    whole = max(1, round(idle))
    interval = max(1, round(idle / 6))
    give_up_ms = int((whole + KEEPALIVE_PROBES * interval) * 1000)
    return [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, whole),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
        (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, give_up_ms),
    ]
