"""The client's side of a connection: its socket's callbacks (reads and the
framing, backpressure, EOF, write pauses, the end), the PROXY header a
trusted peer sends first, and the waits for an upstream. See connbase.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from pmlb.dataplane import proxyproto
from pmlb.dataplane.connbase import ConnBase, Link
from pmlb.dataplane.mark import BOUND, CLOSED, MOVING, WAITING
from pmlb.errors import FrameTooLarge, FramingError
from pmlb.protocol import reasons, wire

log = logging.getLogger("pmlb.conn")


class ClientSide(ConnBase):
    """The socket's half of a client connection (``conn.ClientConn``)."""

    __slots__ = ()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            # Interned: clients behind one NAT or proxy share one string.
            self.client_addr, self.client_port = sys.intern(peer[0]), peer[1]
        self.accepted_ms = int(time.time() * 1000)
        transport.set_write_buffer_limits(high=self.plane.config.client_buffer)
        header = self._proxied
        if header is not None:
            self._proxied = None
            if not header.local:
                self.client_addr, self.client_port = header.src_addr, header.src_port
            self.plane.accept(self)
            return
        if self.plane.expects_proxy(self.client_addr):
            # The mark is made once the PROXY header says who the client is.
            self.proxy_buf = b""
            self._arm(self.plane.config.proxy_timeout, self._proxy_timeout)
            return
        self.plane.accept(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        if self.proxy_buf is not None:
            self._proxy_data(data)
            return
        state = self.core.state
        if state != BOUND:
            if state in (WAITING, MOVING) and data:
                self.read_paused = False  # the earlier pause did not take
                self._pause_reading()
                (self.early or self._start_early()).append(data)
            return  # after EOF or while closing nothing more is forwarded
        try:
            messages = self.decoder.feed(data)
        except FrameTooLarge as exc:
            self.plane.stats.frames_too_large += 1
            log.warning("mark=%s client sent an oversized frame: %s", self.mark, exc)
            self.close(reasons.FRAME_TOO_LARGE, str(exc))
            return
        except FramingError as exc:
            self.plane.stats.framing_errors += 1
            log.warning(
                "mark=%s client broke the %s framing: %s", self.mark, self.plane.config.framing, exc
            )
            self.close(reasons.PROTOCOL_ERROR, f"bad framing: {exc}")
            return
        if not messages:
            return
        self._forward(messages)  # behind any parked ones (Mark.take)

    def _forward(self, messages: list[bytes]) -> None:
        """Send what the mark's credit allows upstream (Mark.take parks the rest)."""
        core = self.core
        link = core.route
        assert link is not None
        n = core.take(messages)
        if n:
            writer = link.writer
            mark = self.mark
            seq = core.seq - n
            total = 0
            for i in range(n):
                msg = messages[i]
                seq += 1
                f = writer.frame()
                f.mark = mark
                d = f.data
                d.seq = seq
                d.payload = msg
                total += len(msg)
            if not link.expect_since:
                link.expect_since = time.monotonic()
            if core.replay_overflowed:
                self._replay_overflow(link)
                return
            # Every frame costs its bytes plus a fixed overhead, so empty
            # messages are not free: a flood of them fills the link like any other.
            writer.add_payload(total + n * wire.FRAME_OVERHEAD)
            writer.kick()
            self.frames_in += n
            self.bytes_in += total
            stats = self.plane.stats
            stats.frames_in += n
            stats.bytes_in += total
            if writer.pending_bytes > self.plane.config.link_buffer:
                link.check_congestion()
        if not core.reads(link.congested):
            self._pause_reading()

    def _replay_overflow(self, link: Link[Any]) -> None:
        self.plane.stats.replay_overflows += 1
        if self.span is not None:
            self.plane.tracer.child(
                self.span, "pmlb.replay_overflow", {"pmlb.replay_bytes": self.core.replay_bytes}
            )
        log.warning(
            "mark=%s replay buffer over %d bytes (upstream %s is not acknowledging)",
            self.mark,
            self.plane.config.replay_buffer,
            link.id,
        )
        self.close(reasons.REPLAY_OVERFLOW, "unacknowledged client data over the replay bound")

    def eof_received(self) -> bool:
        if self.core.state == BOUND:
            if not self.core.client_eof():
                return True  # passed on once the parked messages are sent
            # Half-close: tell the upstream, keep our write side open so its
            # last replies still reach the client, bounded by close_linger.
            self._send_close(reasons.CLIENT_CLOSED, "")
            self.close_reason = reasons.CLIENT_CLOSED
            self._detach()
            self._arm(self.plane.config.close_linger, self._linger_expired)
            return True
        if self.core.state == WAITING and not self.early and not self.core.replay:
            self.close(reasons.CLIENT_CLOSED, "client left before an upstream was bound")
            return False
        if self.core.state in (WAITING, MOVING):
            # Keep waiting: what the client sent before its EOF still goes out.
            (self.early or self._start_early()).append(b"")
            return True
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.paused_frames = 0
        if self.core.owed:
            self._grant()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.core.state in (WAITING, BOUND, MOVING):
            reason = reasons.CLIENT_RESET if exc is not None else reasons.CLIENT_CLOSED
            self.close_reason = reason
            if self.core.state == BOUND:
                # The upstream learns why: "[Errno 110] Connection timed out"
                # (keepalive gave up) reads differently from a reset.
                self._send_close(reason, str(exc)[:200] if exc is not None else "")
                self._detach()
            elif self.core.state == MOVING:
                self._detach()  # the old upstream was already told (Close "moved")
            else:
                self.plane.unwait(self)
        self.core.state = CLOSED
        self._disarm()
        self.plane.forget(self)

    def resume_if_unblocked(self) -> None:
        """Resume reading when nothing holds it back any more (Mark.reads):
        first send what was parked, then the EOF that waited behind it."""
        link = self.core.route
        transport = self.transport
        if not self.read_paused or link is None or transport is None:
            return
        if self.core.state != BOUND or self.core.credit <= 0 or link.congested:
            return
        parked = self.core.unpark()
        if parked is not None:
            self._forward(parked)
            if self.core.state != BOUND:
                return
            if self.core.eof_due():
                if not self.eof_received() and self.transport is not None:
                    self.transport.close()
                return
        if self.core.reads(link.congested):
            self.read_paused = False
            transport.resume_reading()

    def wait_for_upstream(self, timeout: float) -> None:
        self._pause_reading()
        self._arm(timeout, self._no_upstream)

    def wait_for_failover(self, timeout: float) -> None:
        self._pause_reading()
        self._arm(timeout, self._failover_expired)

    def _failover_expired(self) -> None:
        self.timer = None
        log.warning(
            "mark=%s no upstream to resume on within %.1fs, closing",
            self.mark,
            self.plane.config.connect_timeout,
        )
        self.close(reasons.UPSTREAM_LOST, "no routable upstream to resume on", notify=False)

    def _no_upstream(self) -> None:
        self.timer = None
        self.plane.stats.no_upstream += 1
        log.warning(
            "mark=%s client=%s:%d no routable upstream within %.1fs, closing",
            self.mark,
            self.client_addr,
            self.client_port,
            self.plane.config.connect_timeout,
        )
        self.close(reasons.NO_UPSTREAM, "no routable upstream")

    def _linger_expired(self) -> None:
        self.timer = None
        self.close(reasons.CLIENT_CLOSED, "upstream did not close within the linger time")

    def _proxy_data(self, data: bytes) -> None:
        buf = self.proxy_buf + data if self.proxy_buf else data
        try:
            header, used = proxyproto.parse(buf)
        except proxyproto.BadProxyHeader as exc:
            self._proxy_failed(str(exc))
            return
        if header is None:
            self.proxy_buf = buf
            return
        self.proxy_buf = None
        self._disarm()
        if not header.local:
            self.client_addr, self.client_port = header.src_addr, header.src_port
        self.plane.accept(self)
        if used < len(buf) and self.transport is not None:
            self.data_received(buf[used:])

    def _proxy_timeout(self) -> None:
        self.timer = None
        self._proxy_failed(f"no PROXY header within {self.plane.config.proxy_timeout:.1f}s")

    def _proxy_failed(self, why: str) -> None:
        self.plane.stats.proxy_errors += 1
        log.warning(
            "client=%s:%d (trusted proxy) closed: %s", self.client_addr, self.client_port, why
        )
        self.proxy_buf = None
        self._disarm()
        self.core.closing()
        if self.transport is not None:
            self.transport.abort()
