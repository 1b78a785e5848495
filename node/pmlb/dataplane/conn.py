"""One client TCP connection: the socket side of a mark.

A ClientConn is an ``asyncio.Protocol`` holding a ``mark.Mark`` (``core``),
the I/O-free state of the mark (credits, replay buffer, bind / move / resume,
strikes): the loop calls it back on reads, no task or stream per connection,
which keeps an idle connection at a few hundred bytes of Python objects. This
module turns socket events into Mark calls and Mark answers into frames,
pauses, closes. See mark.py for the states and the decisions.

Flow control, both ways, per mark:

* client -> upstream: ``credit`` is what the bound upstream still accepts; at
  zero (or while the link itself is congested) the socket stops being read, so
  the kernel pushes back on the client.
* upstream -> client: payloads are written to the transport and their bytes
  are returned to the upstream as Flow credit, but only while the transport's
  buffer is under ``client_buffer``; a client that does not read thus holds at
  most ``client_buffer + window`` bytes here. Data beyond a hard bound (only a
  peer ignoring credit, or pushes, can cause it) closes the mark with
  ``write_overflow``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pmlb.dataplane import proxyproto
from pmlb.dataplane.mark import (
    BOUND,
    CLEARED,
    CLIENT_EOF,
    CLOSE_BOUND,
    CLOSED,
    CLOSING,
    FINISHED,
    GRANT,
    IGNORE,
    MOVE_DONE,
    MOVING,
    POISONED,
    RESUME,
    STALE,
    STATE_NAMES,
    UNBLOCKED,
    WAITING,
    Mark,
)
from pmlb.errors import FrameTooLarge, FramingError
from pmlb.observability.logs import fields
from pmlb.protocol import reasons, wire

if TYPE_CHECKING:
    from pmlb._proto.pmlb.v1 import upstream_pb2 as pb
    from pmlb.config import NodeConfig
    from pmlb.dataplane.framing import Decoder
    from pmlb.dataplane.mark import MarkLimits
    from pmlb.dataplane.watch import MarkWatch
    from pmlb.observability.stats import NodeStats
    from pmlb.observability.tracing import ConnTracer

log = logging.getLogger("pmlb.conn")


# What a connection needs of the link it is bound to (dataplane.link.Link)
# and of its data plane (dataplane.plane.DataPlane), declared here so that
# neither module is imported by this one: the plane and its links are built
# on connections, not the other way round.
class Link(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def writer(self) -> wire.BatchWriter: ...
    @property
    def overhead(self) -> int: ...
    @property
    def peer_window(self) -> int: ...
    @property
    def is_up(self) -> bool: ...
    @property
    def congested(self) -> bool: ...
    @property
    def stalled(self) -> set[ClientConn]: ...

    expect_since: float  # when the link began to wait for an answer (0: not)

    def attach(self, conn: ClientConn) -> None: ...
    def detach(self, conn: ClientConn) -> None: ...
    def check_congestion(self) -> None: ...


class Plane(Protocol):
    @property
    def config(self) -> NodeConfig: ...
    @property
    def stats(self) -> NodeStats: ...
    @property
    def tracer(self) -> ConnTracer: ...
    @property
    def watch(self) -> MarkWatch: ...
    @property
    def mark_limits(self) -> MarkLimits: ...
    @property
    def max_frame(self) -> int: ...
    @property
    def max_meta(self) -> int: ...
    @property
    def listener_name(self) -> str: ...
    @property
    def write_hard_limit(self) -> int: ...
    @property
    def encode(self) -> Callable[[bytes], bytes]: ...

    def new_decoder(self) -> Decoder: ...
    def expects_proxy(self, addr: str) -> bool: ...
    def accept(self, conn: ClientConn) -> None: ...
    def rebind(self, conn: ClientConn) -> None: ...
    def unwait(self, conn: ClientConn) -> None: ...
    def forget(self, conn: ClientConn) -> None: ...
    def cleared(self, conn: ClientConn) -> None: ...


__all__ = ["BOUND", "CLIENT_EOF", "CLOSED", "CLOSING", "MOVING", "WAITING", "ClientConn"]


class ClientConn(asyncio.Protocol):
    __slots__ = (
        "_proxied",
        "accepted_ms",
        "bytes_in",
        "bytes_out",
        "client_addr",
        "client_port",
        "close_reason",
        "core",
        "decoder",
        "early",
        "frames_in",
        "frames_out",
        "last_active",
        "lost_at",
        "mark",
        "meta",
        "paused_frames",
        "plane",
        "proxy_buf",
        "read_paused",
        "span",
        "timer",
        "transport",
        "write_paused",
    )

    def __init__(self, plane: Plane, proxied: proxyproto.ProxyHeader | None = None) -> None:
        # The I/O-free state of the mark (dataplane.mark): this class turns
        # socket events into its calls and does what its answers say.
        self.core: Mark[Link] = Mark(plane.mark_limits)
        # A PROXY header the acceptor already read (before a TLS handshake).
        self.proxy_buf: bytes | None = None
        self._proxied = proxied
        self.plane = plane
        self.transport: asyncio.Transport | None = None
        self.mark = ""
        self.decoder = plane.new_decoder()
        self.bytes_in = self.bytes_out = self.frames_in = self.frames_out = 0
        self.read_paused = False
        self.write_paused = False
        self.meta: dict[str, str] | None = None
        # Reads (and EOF) that arrived before a bind. uvloop ignores a
        # pause_reading() made inside connection_made, so a waiting client's
        # first read can still arrive; it is kept (at most one read per pause)
        # and forwarded after the Open. b"" marks an EOF.
        self.early: list[bytes] | None = None
        # Frames written to the client while its transport was paused.
        self.paused_frames = 0
        self.span: Any = None  # the connection's root span when tracing is on
        self.timer: asyncio.TimerHandle | None = None
        self.close_reason = ""
        self.client_addr = ""
        self.client_port = 0
        self.accepted_ms = 0
        self.last_active = 0.0  # monotonic time of the last byte either way
        self.lost_at = 0.0  # when its link broke, until it resumes (failover time)

    # -- asyncio.Protocol -------------------------------------------------

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
        if self.core.state != BOUND:
            if self.core.state in (WAITING, MOVING) and data:
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
        link = self.core.route
        assert link is not None
        n = self.core.take(messages)
        if n:
            writer = link.writer
            mark = self.mark
            seq = self.core.seq - n
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
            if self.core.replay_overflowed:
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
        if not self.core.reads(link.congested):
            self._pause_reading()

    def _replay_overflow(self, link: Link) -> None:
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

    # -- called by the plane and links ------------------------------------

    def bind(self, link: Link) -> None:
        """Bind this (waiting) mark to ``link``: send its Open, then replay what
        the previous upstream had not acknowledged, with the same seq numbers."""
        self._disarm()
        next_seq, resumed = self.core.bind_to(link)
        link.attach(self)
        cfg = self.plane.config
        writer = link.writer
        f = writer.frame()
        f.mark = self.mark
        o = f.open
        o.service = cfg.service
        o.client_addr = self.client_addr
        o.client_port = self.client_port
        o.node_id = cfg.node_id
        replay = self.core.replay
        o.next_seq = next_seq
        o.framing = cfg.framing
        o.max_frame = self.plane.max_frame
        o.max_meta = self.plane.max_meta
        o.listener = self.plane.listener_name
        o.accepted_at_unix_ms = self.accepted_ms
        o.resumed = resumed
        if self.meta:
            o.metadata.update(self.meta)
        if self.span is not None:
            tracer = self.plane.tracer
            o.trace_context.update(tracer.carrier(self.span))
            tracer.child(
                self.span,
                "pmlb.failover" if resumed else "pmlb.bind",
                {
                    "pmlb.mark": self.mark,
                    "pmlb.upstream": link.id,
                    "pmlb.resumed": resumed,
                    "pmlb.replayed_frames": len(replay or ()),
                },
            )
            self.span.set_attribute(f"pmlb.upstream.{self.core.binds}", link.id)
        if replay:
            for seq, msg in replay:
                f = writer.frame()
                f.mark = self.mark
                d = f.data
                d.seq = seq
                d.payload = msg
            writer.add_payload(self.core.replay_bytes)
            if not link.expect_since:
                link.expect_since = time.monotonic()
        writer.kick()
        if self.plane.watch.watchers:
            self.plane.watch.changed(self)
        if resumed:
            self.plane.stats.failovers += 1
            if self.lost_at:
                self.plane.stats.failover_time.observe(time.monotonic() - self.lost_at)
                self.lost_at = 0.0
            log.info(
                "mark=%s resumed on upstream=%s, %d frames replayed from seq %d",
                self.mark,
                link.id,
                len(replay or ()),
                o.next_seq,
                extra=fields(mark=self.mark, upstream=link.id),
            )
        else:
            log.debug("mark=%s bound upstream=%s", self.mark, link.id)
        early, self.early = self.early, None
        for data in early or ():
            if data:
                self.data_received(data)
            elif self.eof_received() is False and self.transport is not None:
                self.transport.close()
        if self.read_paused:
            self.resume_if_unblocked()

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

    def deliver(self, payload: bytes, acked: int, link: Link | None) -> None:
        """Data for the client from an upstream (``link``) or the control API (None);
        ``acked`` is the acknowledgement riding on it."""
        verdict = self.core.reply(link, acked, len(payload))
        if not verdict:
            # A late reply of the upstream this mark was moved off after its
            # move timed out: the frames it answers were replayed to the next
            # upstream, which answers them; delivering both would duplicate.
            self.plane.stats.stale_replies += 1
            return
        if verdict & CLEARED:
            # What was in flight when the last link broke has been processed:
            # this mark did not break it.
            self.plane.cleared(self)
        transport = self.transport
        if self.core.state >= CLOSING or transport is None:
            return
        try:
            out = self.plane.encode(payload)
        except FrameTooLarge as exc:
            self.plane.stats.bad_frames_from_upstream += 1
            log.warning(
                "mark=%s upstream %s sent a payload the framing cannot carry: %s",
                self.mark,
                link.id if link else "control API",
                exc,
            )
            self.close(reasons.PROTOCOL_ERROR, f"upstream payload too large: {exc}")
            return
        transport.write(out)
        self.last_active = time.monotonic()
        n = len(payload)
        self.bytes_out += n
        self.frames_out += 1
        if not self.write_paused:
            if verdict & GRANT:
                self._grant()
            return
        self.paused_frames += 1
        buffered = transport.get_write_buffer_size() + self.paused_frames * wire.FRAME_OVERHEAD
        if buffered > self.plane.write_hard_limit:
            self.plane.stats.write_overflows += 1
            log.warning(
                "mark=%s client is not reading; %d bytes buffered, closing",
                self.mark,
                transport.get_write_buffer_size(),
            )
            self.close(reasons.WRITE_OVERFLOW, "client buffer bound exceeded", abort=True)

    def on_flow(self, credit: int, acked: int, link: Link) -> None:
        verdict = self.core.flow(link, credit, acked)
        if verdict & CLEARED:
            self.plane.cleared(self)
        if verdict & UNBLOCKED:
            self.resume_if_unblocked()

    def on_meta(self, meta: pb.Meta, max_bytes: int) -> int:
        """Apply an upstream's metadata change: 0, or the size it would have
        reached when that exceeds the bound (then nothing changes)."""
        current = dict(self.meta or {})
        current.update(meta.set)
        for key in meta.unset:
            current.pop(key, None)
        size = sum(len(k) + len(v) for k, v in current.items())
        if size > max_bytes:
            return size
        self.meta = current or None
        return 0

    def upstream_close(self, reason: str, detail: str, link: Link) -> None:
        verdict = self.core.upstream_closed(link)
        if verdict == STALE:
            # The answer to our "moved" close, after the move had timed out.
            self.plane.stats.stale_replies += 1
            return
        if verdict == IGNORE:
            return
        if verdict == MOVE_DONE:
            # The old upstream acknowledged the move after answering everything
            # it had: now bind elsewhere and replay whatever is still unacked.
            self._finish_move()
            return
        if verdict == CLOSE_BOUND:
            # Closed by another upstream (push): the bound one must forget it too.
            self._send_close(reason, detail)
        self.close(reason, detail, notify=False)

    def on_link_lost(self) -> None:
        """The bound upstream is gone: keep the mark and move it (failover),
        unless its frames were in flight on the previous broken link too."""
        was_eof = self.core.state == CLIENT_EOF
        link = self.core.route
        verdict = self.core.route_lost()
        if verdict == POISONED:
            self._poisoned()
        elif verdict == FINISHED:
            self.close(reasons.CLIENT_CLOSED, "upstream lost after the last reply", notify=False)
        elif verdict == RESUME:
            self.lost_at = time.monotonic()
            if link is not None:
                link.detach(self)
            if was_eof:
                # The client is done sending but replies are owed: resume
                # elsewhere and pass the EOF on after the replay.
                (self.early or self._start_early()).append(b"")
            self.plane.rebind(self)

    def _poisoned(self) -> None:
        # Like a poison message in a queue: the frames this mark had in flight
        # took down two upstreams in a row. Replaying them to a third would
        # most likely take it down as well, and every mark on it.
        replay = self.core.replay
        first, last = (replay[0][0], replay[-1][0]) if replay else (0, 0)
        self.plane.stats.poisoned += 1
        log.warning(
            "mark=%s frames %d..%d were in flight on two upstream links that broke "
            "in a row; closing the mark instead of replaying them again",
            self.mark,
            first,
            last,
            extra=fields(mark=self.mark, reason=reasons.POISON),
        )
        if self.span is not None:
            self.plane.tracer.child(
                self.span, "pmlb.poison", {"pmlb.first_seq": first, "pmlb.last_seq": last}
            )
        self.close(
            reasons.POISON,
            f"frames {first}..{last} in flight on two links that broke",
            notify=False,
        )

    def start_move(self, detail: str) -> None:
        """Move this mark off its upstream gracefully (drain): stop reading, ask the
        upstream to close it after answering what it has, then rebind."""
        link = self.core.route
        if link is None or self.core.state != BOUND:
            return
        self._send_close(reasons.MOVED, detail)
        self.core.begin_move()
        if self.span is not None:
            self.plane.tracer.child(
                self.span, "pmlb.move", {"pmlb.from_upstream": link.id, "pmlb.why": detail}
            )
        self._pause_reading()
        self._arm(self.plane.config.move_timeout, self._move_timed_out)

    def _move_timed_out(self) -> None:
        self.timer = None
        if self.core.state != MOVING:
            return
        self.core.move_timed_out()
        self.plane.stats.move_timeouts += 1
        log.warning(
            "mark=%s upstream %s did not answer the move within %.1fs; moving on, "
            "its late replies for this mark will be dropped",
            self.mark,
            self.core.route.id if self.core.route else "-",
            self.plane.config.move_timeout,
        )
        self._finish_move()

    def _finish_move(self) -> None:
        self.timer = None
        if self.core.state != MOVING:
            return
        self._detach()
        self.core.end_move()
        self.plane.rebind(self)

    def close(
        self, reason: str, detail: str = "", *, notify: bool = True, abort: bool = False
    ) -> None:
        """Close the client connection (flushing what it has, unless ``abort``)."""
        if self.core.state >= CLOSING:
            return
        if self.core.state == WAITING:
            self.plane.unwait(self)
        elif self.core.state in (BOUND, MOVING) and notify:
            self._send_close(reason, detail)
        if self.core.state != CLIENT_EOF or not self.close_reason:
            self.close_reason = reason
        self._detach()
        self.core.closing()
        self._disarm()
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abort()
            return
        transport.close()
        if transport.get_write_buffer_size():
            # A client that does not read would keep close() pending forever.
            self._arm(self.plane.config.close_linger, transport.abort)

    # What the plane, its links and the admin API read of the mark.
    @property
    def state(self) -> int:
        return self.core.state

    @property
    def route(self) -> Link | None:
        return self.core.route

    @property
    def strikes(self) -> int:
        return self.core.strikes

    @property
    def binds(self) -> int:
        return self.core.binds

    def is_stale(self, route: object) -> bool:
        return self.core.is_stale(route)  # type: ignore[arg-type]

    @property
    def upstream_id(self) -> str:
        """The id of the upstream the mark is bound to ("" while unbound)."""
        return self.core.route.id if self.core.route is not None else ""

    def describe(self) -> dict[str, Any]:
        return {
            "mark": self.mark,
            "client_addr": self.client_addr,
            "client_port": self.client_port,
            "upstream": self.core.route.id if self.core.route else "",
            "state": STATE_NAMES[self.core.state],
            "metadata": dict(self.meta or {}),
            "accepted_at_unix_ms": self.accepted_ms,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "binds": self.core.binds,
            "unacked_frames": len(self.core.replay or ()),
        }

    # -- internals ---------------------------------------------------------

    def _send_close(self, reason: str, detail: str) -> None:
        link = self.core.route
        if link is None or not link.is_up:
            return
        f = link.writer.frame()
        f.mark = self.mark
        c = f.close
        c.reason = reason
        if detail:
            c.detail = detail
        link.writer.kick()

    def _grant(self) -> None:
        link = self.core.route
        if link is None or not link.is_up:
            return
        f = link.writer.frame()
        f.mark = self.mark
        f.flow.credit = self.core.take_grant()
        link.writer.kick()

    def _detach(self) -> None:
        link = self.core.route
        if link is not None:
            link.detach(self)

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
            if self.core.state == BOUND:
                self.plane.stats.credit_stalls += 1
                if self.core.route is not None and self.core.route.congested:
                    self.core.route.stalled.add(self)

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

    def _start_early(self) -> list[bytes]:
        self.early = []
        return self.early

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

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
